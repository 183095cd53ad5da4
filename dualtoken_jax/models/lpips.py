"""LPIPS, the VGG16 variant (taming-transformers / richzhang v0.1) that DualToken trains with (NHWC).

  d(x, y) = Σ_l mean_hw( Σ_c w_lc · (n(φ_l(x')) − n(φ_l(y')))²_c ),   x' = (x − shift) / scale,

with φ_l the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (64, 128, 256, 512,
512 channels), n(·) unit-normalisation along channels and w_l the 1×1 no-bias heads `lin{l}`.
Inputs are images in [-1, 1]; the result is one distance per batch element, float32.

The weights are frozen ImageNet VGG16 (torchvision) plus the LPIPS v0.1 heads (`vgg.pth`), which
`python -m dualtoken_jax.convert_lpips` turns into one `.npz` for `bridges.lpips.load`. Parameter names
carry torchvision's feature index (`vgg/conv{idx}`), so the mapping is `features.{idx}` -> `conv{idx}`.
The reference's dropout before each head is inactive (the module runs in eval mode), so none here.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

Dtype = Any

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10

# torchvision `vgg16().features` up to relu5_3: per stage, (feature index, output channels) of its
# 3×3 convs, each followed by ReLU. A 2×2/2 max-pool precedes every stage but the first, and each
# stage's last ReLU is an LPIPS tap.
VGG16_STAGES = (
    ((0, 64), (2, 64)),
    ((5, 128), (7, 128)),
    ((10, 256), (12, 256), (14, 256)),
    ((17, 512), (19, 512), (21, 512)),
    ((24, 512), (26, 512), (28, 512)),
)
TAP_CHANNELS = tuple(stage[-1][1] for stage in VGG16_STAGES)  # (64, 128, 256, 512, 512)


def vgg16_conv_channels() -> dict[int, tuple[int, int]]:
  """torchvision feature index of each conv -> (input channels, output channels)."""
  out, c_in = {}, 3
  for stage in VGG16_STAGES:
    for idx, c_out in stage:
      out[idx] = (c_in, c_out)
      c_in = c_out
  return out


def scale_input(x: jax.Array) -> jax.Array:
  """[-1, 1] images -> the inputs the LPIPS VGG expects: (x − shift) / scale per RGB channel."""
  return (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)


def normalize_channels(f: jax.Array, eps: float = EPS) -> jax.Array:
  """f / (‖f‖₂ + eps) along the last axis.

  The norm is built with the double-`where` trick: forward values are exactly sqrt(Σf²), but an
  all-zero vector (a position where every ReLU is off) gets the true derivative I/eps instead of
  the 0·∞ = NaN that differentiating sqrt at 0 produces.
  """
  sq = jnp.sum(f * f, axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return f / (norm + eps)


def _max_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # floor mode, as torch's default


class VGG16Features(nn.Module):
  """VGG16 convolutional trunk; returns the five LPIPS taps (NHWC), relu1_2 first."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    taps = []
    for s, stage in enumerate(VGG16_STAGES):
      if s:
        x = _max_pool(x)
      for idx, c_out in stage:
        x = nn.Conv(c_out, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"conv{idx}")(x)
        x = nn.relu(x)
      taps.append(x)
    return tuple(taps)


class LPIPS(nn.Module):
  """(B, H, W, 3) images x, y in [-1, 1] -> (B,) LPIPS distances, float32.

  `dtype` is the VGG's compute dtype; normalisation, heads and means always run in float32.
  H and W must be at least 16 (four 2×2 pools before relu5_3).
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"LPIPS expects two (B, H, W, 3) images of one shape, got {x.shape} and {y.shape}")
    if min(x.shape[1:3]) < 16:
      raise ValueError(f"LPIPS needs images of at least 16×16 (four 2×2 pools), got {x.shape[1:3]}")
    b = x.shape[0]
    # One VGG pass over both images: same weights, half the kernel launches.
    feats = VGG16Features(self.dtype, name="vgg")(scale_input(jnp.concatenate([x, y]).astype(jnp.float32)))
    total = jnp.zeros((b,), jnp.float32)
    for k, f in enumerate(feats):
      f = normalize_channels(f.astype(jnp.float32))
      diff = jnp.square(f[:b] - f[b:])
      head = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, name=f"lin{k}")(diff)
      total = total + jnp.mean(head[..., 0], axis=(1, 2))
    return total


def lpips_fn(params, dtype: Dtype = jnp.float32) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A frozen distance function `(x, y) -> (B,)`: gradients flow to the images, never to `params`."""
  model = LPIPS(dtype=dtype)

  def distance(x, y):
    return model.apply({"params": jax.lax.stop_gradient(params)}, x, y)

  return distance


def param_shapes() -> dict[str, tuple[int, ...]]:
  """Flat '/'-joined parameter path -> shape, as `LPIPS().init` creates them (no compute)."""
  dummy = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  shapes = jax.eval_shape(LPIPS().init, jax.random.key(0), dummy, dummy)["params"]
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}
