"""MLLM stage 4, joint training (paper Table "hyper_params"): everything but the tokenizer trains
(lr 1e-5; batch 512 in 4-1, 256 in 4-2), understanding conversations and caption -> image pairs
mixed half and half (`data.generation_share`). From the generation run:

  python -m dualtoken_jax.train_mllm --config configs/mllm_joint.py:llm=qwen2.5_3b,part=1 \
      --workdir WORKDIR --config.init.mllm=GENERATION_WORKDIR \
      --config.text.tokenizer=/ckpt/Qwen2.5-3B-Instruct/tokenizer.json \
      --config.data.train=ift_mix.json \
      --config.data.captions='/data/aesthetics/{0000..0511}.tar'

Args as in configs/mllm_generation.py, plus part (1: batch 512, 2: batch 256).
"""

from dualtoken_jax.mllm import config as C


def get_config(arg=None):
  return C.paper_stage(arg, "joint", total_steps=20_000, max_len=1024, part=1,
                       batch_size=lambda a: 512 if a.part == 1 else 256)
