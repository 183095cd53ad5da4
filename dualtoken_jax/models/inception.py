"""The FID Inception-v3 (`pt_inception-2015-12-05`, pytorch-fid's network) in Flax, NHWC.

Architecture: torchvision's Inception3 trunk with pytorch-fid's FID-specific blocks (the
TensorFlow graph the original FID was defined with):

* every conv is `BasicConv2d`: conv without bias -> BatchNorm (inference form,
  (x − mean)/sqrt(var + 1e-3)·scale + bias) -> ReLU;
* Mixed_5b/5c/5d (`FIDInceptionA`), Mixed_6b…6e (`FIDInceptionC`) and Mixed_7b
  (`FIDInceptionE_1`) pool their last branch with a 3×3/1 average pool, padding 1, that
  **excludes the padding** from the divisor (`count_include_pad=False`);
* Mixed_7c (`FIDInceptionE_2`) pools that branch with a 3×3/1 **max** pool, padding 1;
* Mixed_6a / Mixed_7a are torchvision's InceptionB / InceptionD (3×3/2 max pool branch);
* no auxiliary head; the output is the 2048-d global average of Mixed_7c ("pool3").

Input: (B, H, W, 3) RGB in [0, 1]. As pytorch-fid's `InceptionV3(resize_input=True,
normalize_input=True)`, the images are resized to 299×299 with bilinear interpolation (PyTorch's
`align_corners=False`, no antialiasing; see `resize_bilinear`) and mapped to [-1, 1] by 2x − 1.
clean-fid (the reference's rFID tool, spec C.1) instead resizes with PIL bicubic beforehand;
feed such 299×299 images and the resize here is the identity.

Parameter names mirror pytorch-fid's module names: `params/Mixed_5b/branch1x1/conv/kernel`,
`params/…/bn/{scale,bias}` and `batch_stats/…/bn/{mean,var}` for
`Mixed_5b.branch1x1.conv.weight`, `….bn.{weight,bias,running_mean,running_var}`.
`dualtoken_jax.convert_inception` converts the released `.pth`; `bridges.inception.load(path)`
reads the result.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

FID_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)   # symmetric (rows, cols), as PyTorch's `padding=`
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


def max_pool_3x3(x, stride: int, pad: int = 0):
  return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


def avg_pool_3x3_exclude_pad(x):
  """3×3/1 average pool, padding 1, dividing by the number of *in-image* taps (4, 6 or 9)."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class _Block(nn.Module):
  """Shared plumbing: `self.conv(name, features, kernel, stride, padding)` builds a BasicConv2d."""
  precision: Any = jax.lax.Precision.HIGHEST

  def conv(self, name, features, kernel, strides=1, padding=0):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    return BasicConv2d(features, kernel, (strides, strides), padding, self.precision, name=name)


class InceptionA(_Block):
  """Mixed_5b/5c/5d (pytorch-fid `FIDInceptionA`): 64 + 64 + 96 + pool_features channels."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64, 1)(x)
    b5 = self.conv("branch5x5_1", 48, 1)(x)
    b5 = self.conv("branch5x5_2", 64, 5, padding=2)(b5)
    b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
    b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
    bp = self.conv("branch_pool", self.pool_features, 1)(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a (torchvision `InceptionB`): stride-2 reduction, 384 + 96 + C_in channels."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
    bd = self.conv("branch3x3dbl_1", 64, 1)(x)
    bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
    bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
    return jnp.concatenate([b3, bd, max_pool_3x3(x, 2)], axis=-1)


class InceptionC(_Block):
  """Mixed_6b…6e (pytorch-fid `FIDInceptionC`): factorised 7×7 branches, 4 × 192 channels."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192, 1)(x)
    b7 = self.conv("branch7x7_1", c7, 1)(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv("branch7x7dbl_1", c7, 1)(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv("branch_pool", 192, 1)(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a (torchvision `InceptionD`): stride-2 reduction, 320 + 192 + C_in channels."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_1", 192, 1)(x)
    b3 = self.conv("branch3x3_2", 320, 3, strides=2)(b3)
    b7 = self.conv("branch7x7x3_1", 192, 1)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3(x, 2)], axis=-1)


class InceptionE(_Block):
  """Mixed_7b (`FIDInceptionE_1`, pool="avg") / Mixed_7c (`FIDInceptionE_2`, pool="max").

  320 + 2·384 + 2·384 + 192 = 2048 channels.
  """
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320, 1)(x)
    b3 = self.conv("branch3x3_1", 384, 1)(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = self.conv("branch3x3dbl_1", 448, 1)(x)
    bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    if self.pool == "avg":
      pooled = avg_pool_3x3_exclude_pad(x)
    elif self.pool == "max":
      pooled = max_pool_3x3(x, 1, pad=1)
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    bp = self.conv("branch_pool", 192, 1)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float64 interpolation weights of PyTorch's bilinear, `align_corners=False`.

  Output i samples the input at s = max((i + ½)·n_in/n_out − ½, 0): weight 1 − (s − ⌊s⌋) on
  ⌊s⌋ and s − ⌊s⌋ on min(⌊s⌋ + 1, n_in − 1). No antialiasing when shrinking.
  """
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m


def resize_bilinear(images, size: int = FID_SIZE):
  """(B, H, W, C) -> (B, size, size, C) as `F.interpolate(mode="bilinear", align_corners=False)`.

  Applied as two matrix products with float64-computed weights (exact coordinates; PyTorch
  rounds them in float32, a difference below 1e-5 of the pixel range); the identity when the
  input is already size×size.
  """
  _, h, w, _ = images.shape
  if (h, w) == (size, size):
    return images
  mh = jnp.asarray(bilinear_matrix(h, size), images.dtype)
  mw = jnp.asarray(bilinear_matrix(w, size), images.dtype)
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", mh, images, precision=hp)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=hp)


class FIDInceptionV3(_Block):
  """pytorch-fid's `InceptionV3([3])` (2048-d pool3 features) in Flax.

  Attributes:
    resize_input: bilinearly resize inputs to 299×299 first (pytorch-fid's default).
    normalize_input: map [0, 1] inputs to [-1, 1] by 2x − 1 (pytorch-fid's default); set False
      to feed [-1, 1] images directly.
    precision: conv precision; HIGHEST keeps f32 features on TPU/GPU (no bf16/TF32 passes).
  """
  resize_input: bool = True
  normalize_input: bool = True

  @nn.compact
  def __call__(self, images):
    """(B, H, W, 3) float RGB in [0, 1] -> (B, 2048) float32 pool3 features."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected (B, H, W, 3) RGB images, got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype} "
                       "(divide uint8 images by 255)")
    x = images.astype(jnp.float32)
    if self.resize_input:
      x = resize_bilinear(x)
    if self.normalize_input:
      x = 2.0 * x - 1.0
    c = self.conv
    x = c("Conv2d_1a_3x3", 32, 3, strides=2)(x)
    x = c("Conv2d_2a_3x3", 32, 3)(x)
    x = c("Conv2d_2b_3x3", 64, 3, padding=1)(x)
    x = max_pool_3x3(x, 2)
    x = c("Conv2d_3b_1x1", 80, 1)(x)
    x = c("Conv2d_4a_3x3", 192, 3)(x)
    x = max_pool_3x3(x, 2)
    p = self.precision
    x = InceptionA(p, pool_features=32, name="Mixed_5b")(x)
    x = InceptionA(p, pool_features=64, name="Mixed_5c")(x)
    x = InceptionA(p, pool_features=64, name="Mixed_5d")(x)
    x = InceptionB(p, name="Mixed_6a")(x)
    x = InceptionC(p, channels_7x7=128, name="Mixed_6b")(x)
    x = InceptionC(p, channels_7x7=160, name="Mixed_6c")(x)
    x = InceptionC(p, channels_7x7=160, name="Mixed_6d")(x)
    x = InceptionC(p, channels_7x7=192, name="Mixed_6e")(x)
    x = InceptionD(p, name="Mixed_7a")(x)
    x = InceptionE(p, pool="avg", name="Mixed_7b")(x)
    x = InceptionE(p, pool="max", name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# ---------------------------------------------------------------- weights
def expected_shapes(model: FIDInceptionV3 | None = None) -> dict[str, tuple[int, ...]]:
  """Flat `collection/module/…/leaf` -> shape of every variable (no computation)."""
  model = model or FIDInceptionV3()
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, FID_SIZE, FID_SIZE, 3), jnp.float32))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}
