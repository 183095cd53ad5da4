"""DualToken on SigLIP-L/16-256 (24 blocks), RVQ depth 4: the paper's MLLM tokenizer.

The paper states only the reconstruction tap (6 of 24). The semantic tap is the penultimate
block (23), as in VILA-U; the shortcut keeps the reference's block 4 with weight 0.6.
"""

from dualtoken_jax import config_files
from dualtoken_jax.models import config as mc
from dualtoken_jax.tokenizer_training import recipe


def get_config(arg=None):
  arg = config_files.parse_arg(arg, depth=4, stage=1)
  model = mc.tokenizer_config(
      vision=mc.vit_config("L", patch_size=16), image_size=256,
      layer_recon=6, layer_shortcut=4, weight_shortcut=0.6, layer_sem=23,
      vq_pix=mc.quantizer_config(depth=arg.depth, ema_update="per_level"),
      vq_sem=mc.quantizer_config(depth=arg.depth, ema_update="pooled"),
      decoder=mc.decoder_config(ch=128, ch_mult=(1, 1, 4, 4, 8), attn_resolutions=(16,), in_channels=1024),
      text=mc.text_config(width=1024, depth=24, mlp_dim=4096, num_heads=16, vocab_size=32000, max_len=64))
  return recipe.paper_recipe(model, arg.stage)
