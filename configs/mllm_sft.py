"""MLLM stage 2, understanding SFT (paper Table "hyper_params"): projector and LLM train
(lr 2e-5, batch 256); the tokenizer stays frozen. Start from the alignment run:

  python -m dualtoken_jax.train_mllm --config configs/mllm_sft.py:llm=gemma2_2b \
      --workdir WORKDIR --config.init.mllm=ALIGNMENT_WORKDIR \
      --config.text.spm_model=/ckpt/tokenizer.model --config.data.train=llava_mix665k.json \
      --config.data.image_root=/data/images

Freezing is by regex over per-layer paths, scanned or not: e.g.
`--config.frozen='["llm/layer_(0|1|2)/.*"]'` keeps the first three decoder layers fixed. Args as in configs/mllm_alignment.py.
"""

from dualtoken_jax import config_files
from dualtoken_jax.mllm import config as C


def get_config(arg=None):
  arg = config_files.parse_arg(arg, llm="gemma2_2b", tokenizer="dualtoken_siglip_l16",
                               visual="code_embeddings", attention="causal")
  model = C.paper_model(arg.llm, arg.tokenizer, visual_vector=arg.visual, attention=arg.attention)
  c = C.training_config(model, stage="sft", total_steps=2_600)  # 665k samples, 1 epoch
  c.data.max_len = 1024
  return c
