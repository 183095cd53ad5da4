"""The issue-14 CPU comparison shapes, B/16-224: the tokenizer's stage-1 step at batch 4 beside
the public PyTorch reference on identical shapes (118,682,341 trainable parameters in both).

ViT-B/16 (width 768, 12 blocks); taps shortcut 2 / recon 3 / sem 11; K=16384, d=32, D=4;
decoder ch 64, ch_mult (1,1,2,2,4), in_channels 256, attention at 14x14; no text tower.
`python -m dualtoken_jax.bench train_step --config configs/bench_ref_b16.py`.
"""

from dualtoken_jax.models import config as mc
from dualtoken_jax.tokenizer_training import recipe


def get_config(arg=None):
  del arg
  model = mc.tokenizer_config(
      vision=mc.vit_config("B", patch_size=16), image_size=224,
      layer_recon=3, layer_shortcut=2, weight_shortcut=0.6, layer_sem=11,
      vq_pix=mc.quantizer_config(codebook_size=16384, embed_dim=32, depth=4, ema_update="per_level"),
      vq_sem=mc.quantizer_config(codebook_size=16384, embed_dim=32, depth=4, ema_update="pooled"),
      decoder=mc.decoder_config(ch=64, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(14,),
                                in_channels=256),
      text=None)
  return recipe.training_config(model, stage=1, batch_size=4, total_steps=1000,
                                steps_per_epoch=100)
