"""A tiny DualToken (128 px, 8x8 grid, width 64) that runs in seconds on a laptop CPU.

For demos, tests and CI; not a model anyone should train for quality.
"""

import ml_collections

from dualtoken_jax.models import config as mc
from dualtoken_jax.tokenizer_training import recipe


def get_config(arg=None):
  del arg
  vision = ml_collections.ConfigDict(dict(width=64, depth=4, mlp_dim=128, num_heads=4,
                                          patch_size=16, layer_norm_eps=1e-6))
  model = mc.tokenizer_config(
      vision=vision, image_size=128,
      layer_recon=2, layer_shortcut=1, weight_shortcut=0.6, layer_sem=3,
      vq_pix=mc.quantizer_config(codebook_size=512, embed_dim=8, depth=4, ema_update="per_level"),
      vq_sem=mc.quantizer_config(codebook_size=512, embed_dim=8, depth=4, ema_update="pooled"),
      decoder=mc.decoder_config(ch=32, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(8,), in_channels=64),
      text=mc.text_config(width=64, depth=2, mlp_dim=128, num_heads=4, vocab_size=1000, max_len=16))
  c = recipe.training_config(model, stage=1, batch_size=8, total_steps=1000, steps_per_epoch=100)
  c.optimizer.warmup_steps = 100  # the recipe's 10k would outlast this 1000-step run
  return c
