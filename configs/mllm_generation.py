"""MLLM stage 3, generation (paper Table "hyper_params"): the two visual heads and their
projectors train (lr 1e-4, batch 128); the LLM, the understanding projector and the tokenizer
stay frozen. Caption -> image pairs (text and image order reversed), from the SFT run:

  python -m dualtoken_jax.train_mllm --config configs/mllm_generation.py:llm=qwen2.5_3b \
      --workdir WORKDIR --config.init.mllm=SFT_WORKDIR \
      --config.text.tokenizer=/ckpt/Qwen2.5-3B-Instruct/tokenizer.json \
      --config.data.captions='/data/laion_aesthetics/{00000..01023}.tar'

Captions come from JSON/JSONL ({"image", "caption"}) or webdataset tar shards; 10% of them are
dropped to "" (`data.caption_dropout`) so classifier-free guidance has an unconditional model.
Args as in configs/mllm_alignment.py.
"""

from dualtoken_jax.mllm import config as C


def get_config(arg=None):
  return C.paper_stage(arg, "generation", total_steps=100_000, max_len=512)
