"""The DualToken tokenizer's model config: the paper's backbones, and checks before compiling.

A model config is an `ml_collections.ConfigDict`; files in `configs/` build theirs with
`tokenizer_config(...)`. `validate(config)` checks taps, grid, codebooks and decoder shapes and
raises `ConfigError` naming the field, so a wrong config fails before XLA compiles anything.
`from_dict(saved)` reads a saved (JSON) config back over the current defaults.
"""

from __future__ import annotations

import math

import ml_collections

from dualtoken_jax import config_files
from dualtoken_jax.models.conv import IMPLS as CONV_IMPLS
from dualtoken_jax.quantization.pallas_nearest import IMPLS as NEAREST_CODE_IMPLS

# SigLIP vision widths (big_vision `vit.decode_variant`): width, depth, mlp_dim, heads.
VIT_VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "g-opt": (1536, 40, 6144, 16),
}


ConfigError = config_files.ConfigError  # the project's one config error


def vit_config(variant: str, patch_size: int) -> ml_collections.ConfigDict:
  """A SigLIP vision tower config from a big_vision variant name ("So400m", "L", ...)."""
  if variant not in VIT_VARIANTS:
    raise ConfigError(f"unknown ViT variant {variant!r}; expected one of {sorted(VIT_VARIANTS)}")
  width, depth, mlp_dim, heads = VIT_VARIANTS[variant]
  return ml_collections.ConfigDict(dict(
      width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=patch_size,
      layer_norm_eps=1e-6))


def quantizer_config(*, codebook_size=16384, embed_dim=32, depth=8, ema_update="per_level"):
  """One residual quantizer. `ema_update`: "per_level" (pixel "rq") or "pooled" (semantic "rq_ema")."""
  return ml_collections.ConfigDict(dict(
      codebook_size=codebook_size,
      embed_dim=embed_dim,
      depth=depth,
      decay=0.99,
      eps=1e-5,
      restart_unused_codes=True,
      ema_update=ema_update,
      # Reproduces the reference's "rq_ema" aliasing bug (every level's cached residual is the
      # final one). Only for resuming reference training runs bit-for-bit; off = the intended maths.
      reference_aliasing_bug=False,
      # Codebook rows per distance chunk: peak memory O(N*chunk + K*d) instead of O(N*K).
      distance_chunk=2048,
  ))


def decoder_config(*, ch=128, ch_mult=(1, 1, 4, 4, 8), attn_resolutions=(24,), in_channels=1024):
  return ml_collections.ConfigDict(dict(
      ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=2, attn_resolutions=tuple(attn_resolutions),
      in_channels=in_channels, out_ch=3, dropout=0.0,
      remat=False))  # recompute ResnetBlocks in the backward pass (training memory)


def text_config(*, width, depth, mlp_dim, num_heads, vocab_size, max_len, out_dim=None):
  return ml_collections.ConfigDict(dict(
      width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, vocab_size=vocab_size,
      max_len=max_len, out_dim=out_dim or width, layer_norm_eps=1e-6))


def tokenizer_config(*, vision, image_size, layer_recon, layer_sem, layer_shortcut=None,
                     weight_shortcut=0.6, vq_pix, vq_sem, decoder, decoder_latent_shape=None,
                     text=None, projection_heads=None):
  """Assembles a full tokenizer config (see `configs/` for the paper's settings)."""
  return ml_collections.ConfigDict(dict(
      image_size=image_size,
      vision=vision,
      text=text,  # None: no text tower (zero-shot evaluation needs one).
      layer_recon=layer_recon,
      layer_shortcut=layer_shortcut,
      weight_shortcut=weight_shortcut,
      layer_sem=layer_sem,
      # Heads of the pre/post-quant attention blocks. None: width // embed_dim, the reference's rule.
      projection_heads=projection_heads,
      vq_pix=vq_pix,
      vq_sem=vq_sem,
      decoder=decoder,
      decoder_latent_shape=None if decoder_latent_shape is None else tuple(decoder_latent_shape),
      scan_layers=False,
      remat_policy="none",
      dtype="float32",
      # Queries per attention block in the image tower and the projections (0 = all at once):
      # the same result without a full (B, heads, tokens, tokens) map (training memory).
      attention_chunk=0,
      # How the image tower and the projections attend (`models/attention.py`): "chunked" (the
      # default: Flax attention, `attention_chunk` queries at a time), "xla"
      # (jax.nn.dot_product_attention), "cudnn" (GPU) or "pallas_tpu" (the TPU flash kernel).
      attention_impl="chunked",
      # How the quantizers find the nearest code (`quantization/pallas_nearest.py`): "xla" (the
      # default: the chunked argmin), "auto" (the fused Pallas kernel on GPU/TPU, XLA elsewhere)
      # or "pallas". The kernel is tested in the Pallas interpreter only: it becomes the default
      # once `bench device` has checked it compiled on a real GPU/TPU.
      nearest_code_impl="xla",
      # How the pixel decoder's convolutions run (`models/conv.py`): "xla" (lax.conv, the fastest
      # measured on XLA:CPU), "shifted" (a custom_vjp of shifted GEMMs) or "gemm_dw" (XLA forward
      # and input gradient, kernel gradient as GEMMs). The same numbers and parameters with each.
      conv_impl="xla",
      # Run the Pallas kernels (attention_impl="pallas_tpu", nearest_code_impl="pallas") in the
      # Pallas interpreter on any backend: the same numbers, very slowly (tests, debugging).
      pallas_interpret=False,
  ))


# Fields with no default: a saved config must name them.
_REQUIRED = ("image_size", "layer_recon", "layer_sem", "vision")
_REQUIRED_VISION = ("width", "depth", "mlp_dim", "num_heads", "patch_size")
_REQUIRED_TEXT = ("width", "depth", "mlp_dim", "num_heads", "vocab_size", "max_len")


def from_dict(saved) -> ml_collections.ConfigDict:
  """A tokenizer config from its JSON form (`DualTokenizer.save`'s config.json), validated.

  The saved values are merged over `tokenizer_config`'s current defaults (nested vision, vq_*,
  decoder and text too), so a config written before a field existed loads with that field's
  default; JSON lists become the config's tuples.
  """
  text = saved["text"] if "text" in saved else None
  missing = _missing(saved, _REQUIRED, "") + _missing(saved.get("vision", {}), _REQUIRED_VISION,
                                                      "vision.")
  if text is not None:
    missing += _missing(text, _REQUIRED_TEXT, "text.")
  _check(not missing, f"the saved config lacks {', '.join(missing)} (no default)")
  if text is not None:
    text = text_config(**{k: text[k] for k in _REQUIRED_TEXT})
  vision = saved["vision"]
  defaults = tokenizer_config(
      vision=vit_config("B", vision["patch_size"]), image_size=saved["image_size"],
      layer_recon=saved["layer_recon"], layer_sem=saved["layer_sem"],
      vq_pix=quantizer_config(ema_update="per_level"), vq_sem=quantizer_config(ema_update="pooled"),
      decoder=decoder_config(), text=text)
  config = config_files.merge_saved(defaults, saved)
  validate(config)
  return config


def _missing(saved, fields, prefix: str) -> list[str]:
  return [prefix + f for f in fields if f not in saved]


def grid_size(config) -> int:
  """Patch grid side: the VALID patch conv drops the image's last `image_size % patch` pixels."""
  return config.image_size // config.vision.patch_size


def projection_heads(config, embed_dim: int) -> int:
  return config.projection_heads or config.vision.width // embed_dim


def decoder_latent_size(config) -> tuple[int, int]:
  """The spatial size the pixel decoder's first conv sees."""
  n = len(config.decoder.ch_mult) - 1
  side = config.image_size // 2**n
  return (side, side)


def validate(config) -> None:
  """Raises ConfigError naming the first inconsistent field."""
  v = config.vision
  depth = v.depth
  _check(v.width % v.num_heads == 0, f"vision.width {v.width} is not divisible by vision.num_heads {v.num_heads}")
  _check(config.image_size >= v.patch_size, f"image_size {config.image_size} < vision.patch_size {v.patch_size}")
  _check(1 <= config.layer_recon <= depth, f"layer_recon {config.layer_recon} must be in [1, {depth}] (vision.depth)")
  _check(1 <= config.layer_sem <= depth, f"layer_sem {config.layer_sem} must be in [1, {depth}] (vision.depth)")
  _check(config.layer_recon <= config.layer_sem,
         f"layer_recon {config.layer_recon} must not exceed layer_sem {config.layer_sem}")
  if config.layer_shortcut is not None:
    _check(1 <= config.layer_shortcut <= config.layer_sem,
           f"layer_shortcut {config.layer_shortcut} must be in [1, layer_sem={config.layer_sem}]")
  for name in ("vq_pix", "vq_sem"):
    q = config[name]
    _check(q.ema_update in ("per_level", "pooled"), f"{name}.ema_update must be 'per_level' or 'pooled', got {q.ema_update!r}")
    _check(q.codebook_size >= 1 and q.depth >= 1 and q.embed_dim >= 1,
           f"{name}: codebook_size, depth and embed_dim must be positive")
    _check(v.width % q.embed_dim == 0 or q.embed_dim % v.width == 0,
           f"{name}.embed_dim {q.embed_dim} and vision.width {v.width}: one must divide the other")
    heads = projection_heads(config, q.embed_dim)
    _check(heads >= 1 and max(v.width, q.embed_dim) % heads == 0,
           f"projection_heads {heads} must divide max(vision.width, {name}.embed_dim)")
  d = config.decoder
  up = 2 ** (len(d.ch_mult) - 1)
  _check(config.image_size % up == 0,
         f"image_size {config.image_size} is not divisible by the decoder's upsampling factor {up} "
         f"(2**(len(decoder.ch_mult)-1))")
  latent = decoder_latent_size(config)
  grid = grid_size(config)
  if config.decoder_latent_shape is None:
    _check((grid, grid) == latent,
           f"the token grid is {grid}x{grid} but the decoder expects a {latent[0]}x{latent[1]} latent "
           f"(image_size / 2**(len(ch_mult)-1)); set decoder_latent_shape={list(latent)} to resize")
  else:
    _check(tuple(config.decoder_latent_shape) == latent,
           f"decoder_latent_shape {tuple(config.decoder_latent_shape)} must equal image_size / "
           f"2**(len(decoder.ch_mult)-1) = {latent}")
  _check(d.ch % 32 == 0 and d.in_channels % 32 == 0 and v.width % 32 == 0,
         "GroupNorm(32) needs decoder.ch, decoder.in_channels and vision.width divisible by 32")
  _check(config.remat_policy in REMAT_POLICIES,
         f"remat_policy {config.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
  _check(config.attention_impl in ATTENTION_IMPLS,
         f"attention_impl must be one of {ATTENTION_IMPLS}, got {config.attention_impl!r}")
  _check(config.conv_impl in CONV_IMPLS,
         f"conv_impl must be one of {CONV_IMPLS}, got {config.conv_impl!r}")
  _check(config.nearest_code_impl in NEAREST_CODE_IMPLS,
         f"nearest_code_impl must be one of {NEAREST_CODE_IMPLS}, got {config.nearest_code_impl!r}")
  if config.text is not None:
    t = config.text
    _check(t.width % t.num_heads == 0, f"text.width {t.width} not divisible by text.num_heads {t.num_heads}")


# Remat policy names (MaxText style) -> jax.checkpoint_policies attribute; "none" = no remat.
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "dots": "dots_saveable",
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
}


# The implementations `models/attention.py` offers (named here, with the other config data).
ATTENTION_IMPLS = ("xla", "chunked", "cudnn", "pallas_tpu")


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def tokens_per_image(config) -> int:
  return grid_size(config) ** 2


def describe(config) -> str:
  """One line summary, e.g. for logs."""
  g = grid_size(config)
  return (f"DualToken {config.image_size}px, ViT {config.vision.width}x{config.vision.depth}/"
          f"{config.vision.patch_size}, grid {g}x{g}, taps recon={config.layer_recon} "
          f"shortcut={config.layer_shortcut} sem={config.layer_sem}, "
          f"RVQ K={config.vq_pix.codebook_size} d={config.vq_pix.embed_dim} "
          f"D={config.vq_pix.depth}/{config.vq_sem.depth}, "
          f"{math.prod((g, g, config.vq_pix.depth + config.vq_sem.depth))} codes/image")
