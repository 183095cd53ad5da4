"""A ViT-B/16-224 DualToken (K=16384, D=4, decoder ch 64, ch_mult 1,1,2,2,4): the mid-sized
benchmark config. Taps follow the paper's "first quarter" rule for 12 blocks (recon 3, sem 11).
"""

from dualtoken_jax.models import config as mc
from dualtoken_jax.tokenizer_training import recipe


def get_config(arg=None):
  del arg
  model = mc.tokenizer_config(
      vision=mc.vit_config("B", patch_size=16), image_size=224,
      layer_recon=3, layer_shortcut=2, weight_shortcut=0.6, layer_sem=11,
      vq_pix=mc.quantizer_config(depth=4, ema_update="per_level"),
      vq_sem=mc.quantizer_config(depth=4, ema_update="pooled"),
      decoder=mc.decoder_config(ch=64, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(14,), in_channels=512),
      text=None)
  c = recipe.training_config(model, stage=1, batch_size=8, total_steps=1000, steps_per_epoch=100)
  c.optimizer.warmup_steps = 100  # the recipe's 10k would outlast this 1000-step run
  return c
