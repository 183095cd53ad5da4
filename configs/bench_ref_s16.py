"""The issue-14 CPU comparison shapes, S/16-128: the tokenizer's stage-1 step at batch 4 beside
the public PyTorch reference on identical shapes (19,290,885 trainable parameters in both).

ViT width 384, 6 blocks, 6 heads, MLP 1536; taps shortcut 1 / recon 2 / sem 5; K=4096, d=32,
D=4; decoder ch 32, ch_mult (1,1,2,2,4), in_channels 128, attention at 8x8; no text tower.
`python -m dualtoken_jax.bench train_step --config configs/bench_ref_s16.py`.
"""

import ml_collections

from dualtoken_jax.models import config as mc
from dualtoken_jax.tokenizer_training import recipe


def get_config(arg=None):
  del arg
  vision = ml_collections.ConfigDict(dict(width=384, depth=6, mlp_dim=1536, num_heads=6,
                                          patch_size=16, layer_norm_eps=1e-6))
  model = mc.tokenizer_config(
      vision=vision, image_size=128, layer_recon=2, layer_shortcut=1, weight_shortcut=0.6,
      layer_sem=5,
      vq_pix=mc.quantizer_config(codebook_size=4096, embed_dim=32, depth=4, ema_update="per_level"),
      vq_sem=mc.quantizer_config(codebook_size=4096, embed_dim=32, depth=4, ema_update="pooled"),
      decoder=mc.decoder_config(ch=32, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(8,),
                                in_channels=128),
      text=None)
  return recipe.training_config(model, stage=1, batch_size=4, total_steps=1000,
                                steps_per_epoch=100)
