"""MLLM stage 4, joint training (paper Table "hyper_params"): everything but the tokenizer trains
(lr 1e-5; batch 512 in 4-1, 256 in 4-2), understanding conversations and caption -> image pairs
mixed half and half (`data.generation_share`). From the generation run:

  python -m dualtoken_jax.train_mllm --config configs/mllm_joint.py:llm=gemma2_2b,part=1 \
      --workdir WORKDIR --config.init.mllm=GENERATION_WORKDIR \
      --config.text.spm_model=/ckpt/tokenizer.model --config.data.train=ift_mix.json \
      --config.data.captions='/data/aesthetics/{0000..0511}.tar'

Args as in configs/mllm_generation.py, plus part (1: batch 512, 2: batch 256).
"""

from dualtoken_jax import config_files
from dualtoken_jax.mllm import config as C


def get_config(arg=None):
  arg = config_files.parse_arg(arg, llm="gemma2_2b", tokenizer="dualtoken_siglip_l16",
                               visual="code_embeddings", attention="causal", head_width=0, part=1)
  model = C.paper_model(arg.llm, arg.tokenizer, visual_vector=arg.visual, attention=arg.attention,
                        heads=C.heads_config(width=arg.head_width))
  c = C.training_config(model, stage="joint", batch_size=512 if arg.part == 1 else 256,
                        total_steps=20_000)
  c.data.max_len = 1024
  return c
