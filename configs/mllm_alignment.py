"""MLLM stage 1, alignment (paper Table "hyper_params"): only the projector trains (lr 1e-3,
batch 64), the Gemma decoder and the DualToken tokenizer are frozen.

  python -m dualtoken_jax.train_mllm --config configs/mllm_alignment.py:llm=gemma2_2b \
      --workdir WORKDIR --config.init.llm_orbax=/ckpt/gemma2_2b --config.init.tokenizer=/ckpt/tok \
      --config.text.spm_model=/ckpt/tokenizer.model --config.data.train=blip_558k.json \
      --config.data.image_root=/data/images

Args: llm (a `dualtoken_jax.llm` variant, default gemma2_2b), tokenizer (a tokenizer config,
default dualtoken_siglip_l16: 256 px, 16x16 = 256 image positions, D = 4), visual
(code_embeddings | postquant), attention (causal | prefix_lm).
"""

from dualtoken_jax import config_files
from dualtoken_jax.mllm import config as C


def get_config(arg=None):
  arg = config_files.parse_arg(arg, llm="gemma2_2b", tokenizer="dualtoken_siglip_l16",
                               visual="code_embeddings", attention="causal")
  model = C.paper_model(arg.llm, arg.tokenizer, visual_vector=arg.visual, attention=arg.attention)
  c = C.training_config(model, stage="alignment", total_steps=8_720)  # 558k samples, 1 epoch
  c.data.max_len = 512
  return c
