"""PSNR and SSIM on device (JAX, jit-able, batched), with the reference's exact definitions.

Images are channels-last, `(H, W, C)` or `(B, H, W, C)`, float, RGB in [0, 1] (data range 1).
The reference evaluation (R:eval.py) clamps the decoder output to [-1, 1] and maps it to
[0, 1] before both metrics: `data.images.to_unit` does exactly that.

PSNR (pyiqa `psnr`, RGB, no Y channel, no border crop), per image:
    PSNR = 10 · log10(R² / (MSE + eps)),   MSE = mean over H, W, C of (x − y)²,
with R = `data_range` (1) and eps = 1e-8 as in pyiqa (identical images give 80 dB, not inf).

SSIM (`pytorch_msssim.ssim(X, Y, data_range=1)`), per image:
  * w: 11-tap Gaussian, σ = 1.5, w[i] ∝ exp(−(i − 5)² / (2σ²)), normalised to sum 1, applied
    separably (11 × 11) to each channel.
  * Border handling: **'valid'** filtering, no padding: maps are (H − 10) × (W − 10).
  * μx = w∗x, μy = w∗y, σx² = w∗x² − μx², σy² = w∗y² − μy², σxy = w∗(xy) − μx μy (biased,
    population moments).
  * S = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)),
    C1 = (K1 R)², C2 = (K2 R)², K1 = 0.01, K2 = 0.03.
  * SSIM = mean of S over the valid map of each channel, then the mean over channels.
  This equals `skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1)`: skimage filters with
  reflection padding but crops (11 − 1)/2 = 5 pixels from every border before averaging, which
  leaves exactly the 'valid' region.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """The normalised 1-D Gaussian taps exp(−(i − size//2)² / (2σ²)) / Σ, float64 (size,)."""
  if size < 1 or size % 2 == 0:
    raise ValueError(f"window size must be a positive odd number, got {size}")
  if sigma <= 0:
    raise ValueError(f"sigma must be positive, got {sigma}")
  x = np.arange(size, dtype=np.float64) - size // 2
  g = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
  return g / g.sum()


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_images(x, y, min_size: int = 1):
  """Checks the shapes and dtypes of an image pair; returns them as jax arrays."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.shape != y.shape:
    raise ValueError(f"images must have the same shape, got {x.shape} and {y.shape}")
  if x.ndim not in (3, 4):
    raise ValueError(f"expected images of shape (H, W, C) or (B, H, W, C), got {x.shape}")
  for name, a in (("x", x), ("y", y)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{name} has dtype {a.dtype}; expected float images in [0, data_range] "
                       "(divide uint8 images by 255)")
  h, w = x.shape[-3], x.shape[-2]
  if h < min_size or w < min_size:
    raise ValueError(f"images of {h}x{w} are smaller than the {min_size}x{min_size} SSIM window")
  return x, y


def check_range(x, lo: float = 0.0, hi: float = 1.0, name: str = "images", slack: float = 1e-6):
  """Raises ValueError unless every value of a concrete array lies in [lo, hi] (± slack).

  Called by `psnr`/`ssim` on concrete inputs; skipped under `jit` (values are unknown there).
  """
  if not _is_concrete(x) or x.size == 0:
    return
  finite, amin, amax = (float(v) for v in jax.device_get(_extremes(x)))  # 3 scalars leave device
  if not finite:
    raise ValueError(f"{name} contain NaN or inf")
  if amin < lo - slack or amax > hi + slack:
    raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}] (RGB scaled by the data range), got "
                     f"values in [{amin:.4g}, {amax:.4g}]; map decoder output with "
                     "data.images.to_unit")


@jax.jit
def _extremes(x):
  return jnp.all(jnp.isfinite(x)), jnp.min(x), jnp.max(x)


def psnr(x, y, data_range: float = 1.0, eps: float = 1e-8, validate: bool = True) -> Array:
  """Per-image PSNR in dB: 10·log10(R² / (mean((x − y)²) + eps)), mean over H, W, C.

  Args:
    x, y: (H, W, C) or (B, H, W, C) float images in [0, data_range].
    data_range: R, the span of valid values (1 for [0, 1] images).
    eps: added to the MSE (pyiqa's 1e-8); 0 gives inf for identical images like skimage.
    validate: check the value range of concrete inputs (skipped automatically under jit).

  Returns:
    float32 PSNR, shape () or (B,).
  """
  x, y = _check_images(x, y)
  if validate:
    check_range(x, 0.0, data_range, "x")
    check_range(y, 0.0, data_range, "y")
  return _psnr(x.astype(jnp.float32), y.astype(jnp.float32), data_range, eps)


@jax.jit
def _psnr(x, y, data_range, eps):
  mse = jnp.mean(jnp.square(x - y), axis=(-3, -2, -1))
  return 10.0 * jnp.log10(data_range ** 2 / (mse + eps))


def ssim(x, y, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03, per_channel: bool = False,
         validate: bool = True) -> Array:
  """Per-image SSIM with a Gaussian window and 'valid' borders (pytorch_msssim's definition).

  See the module docstring for the exact formula. Computed in float32 on device; the window
  is applied as shifted multiply-adds, so no TF32/bf16 matmul passes are involved.

  Args:
    x, y: (H, W, C) or (B, H, W, C) float images in [0, data_range]; H, W ≥ win_size.
    data_range: R in C1 = (K1 R)², C2 = (K2 R)².
    win_size, sigma: the Gaussian window (11, 1.5).
    k1, k2: the stabilising constants (0.01, 0.03).
    per_channel: return (…, C) per-channel values instead of their mean.
    validate: check the value range of concrete inputs (skipped automatically under jit).

  Returns:
    float32 SSIM, shape () or (B,) (with a trailing C axis if `per_channel`).
  """
  x, y = _check_images(x, y, min_size=win_size)
  if validate:
    check_range(x, 0.0, data_range, "x")
    check_range(y, 0.0, data_range, "y")
  taps = tuple(float(t) for t in gaussian_window(win_size, sigma))
  out = _ssim_per_channel(x.astype(jnp.float32), y.astype(jnp.float32), taps,
                          float(data_range), float(k1), float(k2))
  return out if per_channel else jnp.mean(out, axis=-1)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _ssim_per_channel(x, y, taps, data_range, k1, k2):
  unbatched = x.ndim == 3
  if unbatched:
    x, y = x[None], y[None]
  # Filter the five moment images at once: channels [x, y, x², y², xy], each C wide.
  stack = jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1)
  blurred = _gaussian_valid(stack, jnp.asarray(taps, jnp.float32))
  mu_x, mu_y, e_xx, e_yy, e_xy = jnp.split(blurred, 5, axis=-1)
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
  var_x, var_y, cov_xy = e_xx - mu_xx, e_yy - mu_yy, e_xy - mu_xy
  luminance = (2 * mu_xy + c1) / (mu_xx + mu_yy + c1)
  contrast_structure = (2 * cov_xy + c2) / (var_x + var_y + c2)
  out = jnp.mean(luminance * contrast_structure, axis=(1, 2))  # (B, C)
  return out[0] if unbatched else out


def _gaussian_valid(x, taps):
  """Separable filtering of (B, H, W, C) with `taps` along H then W, 'valid' borders.

  A weighted sum of k shifted slices per axis: exact f32 arithmetic, fused by XLA, and much
  faster on CPU than a grouped convolution.
  """
  k = taps.shape[0]
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  x = sum(taps[i] * x[:, i:i + h] for i in range(k))
  return sum(taps[i] * x[:, :, i:i + w] for i in range(k))
