"""The README's main job: a small DualToken trained on the photos bundled with scikit-image,
scikit-learn and matplotlib (random crops), on 2 CPU cores in under 10 minutes.

SigLIP starts from random weights here (there is nothing to download), so the "teacher" is the
random initial tower and the run shows the pixel path learning: reconstruction PSNR on the
photos rises over the run and `WORKDIR/images/reconstructions_latest.png` shows it. To start
from real SigLIP weights instead: `--config.init.siglip=/path/to/hf_siglip_dir_or_bv.npz` with a
matching model config (e.g. configs/dualtoken_so400m.py).
"""

import ml_collections

from dualtoken_jax import config_files
from dualtoken_jax.models import config as mc
from dualtoken_jax.tokenizer_training import recipe


def get_config(arg=None):
  # `:test` shrinks images and decoder to the smallest real pipeline (fast to compile in tests).
  arg = config_files.parse_arg(arg, test=False)
  vision = ml_collections.ConfigDict(dict(width=64, depth=4, mlp_dim=128, num_heads=4,
                                          patch_size=8, layer_norm_eps=1e-6))
  size, ch_mult = (32, (1, 1, 1, 1)) if arg.test else (64, (1, 2, 2, 4))
  model = mc.tokenizer_config(
      vision=vision, image_size=size,
      layer_recon=2, layer_shortcut=1, weight_shortcut=0.6, layer_sem=3,
      vq_pix=mc.quantizer_config(codebook_size=256, embed_dim=8, depth=4, ema_update="per_level"),
      vq_sem=mc.quantizer_config(codebook_size=256, embed_dim=8, depth=4, ema_update="pooled"),
      decoder=mc.decoder_config(ch=32, ch_mult=ch_mult, attn_resolutions=(), in_channels=64),
      text=None)
  if arg.test:
    model.decoder.num_res_blocks = 0
  c = recipe.training_config(model, stage=1, batch_size=8, total_steps=500, steps_per_epoch=100)
  c.data.source = "sample"
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 50
  c.gan.start_step = 350      # the last 150 steps add the PatchGAN with its adaptive weight
  c.gan.ndf = 32
  c.gan.lr = 2e-4
  c.gan.warmup_steps = 20
  c.gan.end_lr = 1e-4
  c.checkpoint.every_steps = 200
  c.log_every_steps = 20
  c.eval.every_steps = 100
  c.eval.num_images = 8
  return c
