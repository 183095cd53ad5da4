"""MLLM stage 2, understanding SFT (paper Table "hyper_params"): projector and LLM train
(lr 2e-5, batch 256); the tokenizer stays frozen. Start from the alignment run:

  python -m dualtoken_jax.train_mllm --config configs/mllm_sft.py:llm=qwen2.5_3b \
      --workdir WORKDIR --config.init.mllm=ALIGNMENT_WORKDIR \
      --config.text.tokenizer=/ckpt/Qwen2.5-3B-Instruct/tokenizer.json \
      --config.data.train=llava_mix665k.json \
      --config.data.image_root=/data/images

Freezing is by regex over per-layer paths, scanned or not: e.g.
`--config.frozen='["llm/layer_(0|1|2)/.*"]'` keeps the first three decoder layers fixed. Args as in configs/mllm_alignment.py.
"""

from dualtoken_jax.mllm import config as C


def get_config(arg=None):
  return C.paper_stage(arg, "sft", total_steps=2_600, max_len=1024)  # 665k samples, 1 epoch
