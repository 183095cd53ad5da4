"""MLLM stage 3, generation (paper Table "hyper_params"): the two visual heads and their
projectors train (lr 1e-4, batch 128); the LLM, the understanding projector and the tokenizer
stay frozen. Caption -> image pairs (text and image order reversed), from the SFT run:

  python -m dualtoken_jax.train_mllm --config configs/mllm_generation.py:llm=gemma2_2b \
      --workdir WORKDIR --config.init.mllm=SFT_WORKDIR \
      --config.text.spm_model=/ckpt/tokenizer.model \
      --config.data.captions='/data/laion_aesthetics/{00000..01023}.tar'

Captions come from JSON/JSONL ({"image", "caption"}) or webdataset tar shards; 10% of them are
dropped to "" (`data.caption_dropout`) so classifier-free guidance has an unconditional model.
Args as in configs/mllm_alignment.py, plus head_width (0 = the LLM width).
"""

from dualtoken_jax import config_files
from dualtoken_jax.mllm import config as C


def get_config(arg=None):
  arg = config_files.parse_arg(arg, llm="gemma2_2b", tokenizer="dualtoken_siglip_l16",
                               visual="code_embeddings", attention="causal", head_width=0)
  model = C.paper_model(arg.llm, arg.tokenizer, visual_vector=arg.visual, attention=arg.attention,
                        heads=C.heads_config(width=arg.head_width))
  c = C.training_config(model, stage="generation", total_steps=100_000)
  c.data.max_len = 512
  return c
