"""DualToken on SigLIP(2) So400m, `:res=384,stage=1` style args: `:res=384` (/14, 27x27 grid, RVQ depth 8; the reference's main
config) or `:res=256` (/16, 16x16 grid, depth 4; the reference's 256 config).

The headline numbers (rFID 0.25, zero-shot 82.0) used SigLIP v1 So400m/14-384 weights; the
released code points at SigLIP2 So400m/14-384 (same architecture, 256k-token text tower). The
paper also trained the 256-px backbone with depth 8: add `,depth=8`. `stage` (0, 1, 2) picks
the training recipe's stage (see dualtoken_jax/tokenizer_training/recipe.py).
"""

from dualtoken_jax import config_files
from dualtoken_jax.models import config as mc
from dualtoken_jax.tokenizer_training import recipe


def get_config(arg=None):
  arg = config_files.parse_arg(arg, res=384, depth=0, vocab=256000, stage=1)
  if arg.res not in (384, 256):
    raise ValueError(f"res must be 384 or 256, got {arg.res}")
  patch, depth = (14, 8) if arg.res == 384 else (16, 4)
  depth = arg.depth or depth
  model = mc.tokenizer_config(
      vision=mc.vit_config("So400m", patch_size=patch), image_size=arg.res,
      layer_recon=6, layer_shortcut=4, weight_shortcut=0.6, layer_sem=26,
      vq_pix=mc.quantizer_config(depth=depth, ema_update="per_level"),
      vq_sem=mc.quantizer_config(depth=depth, ema_update="pooled"),
      decoder=mc.decoder_config(ch=128, ch_mult=(1, 1, 4, 4, 8),
                                attn_resolutions=(arg.res // 16,), in_channels=1024),
      # 384/14 gives a 27x27 grid; the x16 decoder wants 24x24: resized bilinearly.
      decoder_latent_shape=(24, 24) if arg.res == 384 else None,
      text=mc.text_config(width=1152, depth=27, mlp_dim=4304, num_heads=16, vocab_size=arg.vocab,
                          max_len=64))
  return recipe.paper_recipe(model, arg.stage)

