"""Pixel-space reconstruction terms (spec B.3), on images in [-1, 1], reduced in float32.

Stage 1 trains with 5·pixel_mse + 1.0·perceptual_loss; the adaptive GAN weight instead uses
`nll_loss` = pixel_mse + 1.0·perceptual_loss (the MSE *unweighted*, as the reference does).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# (reconstruction, target) images -> (B,) distances, e.g. `models.lpips.lpips_fn(params)`.
DistanceFn = Callable[[jax.Array, jax.Array], jax.Array]


def pixel_mse(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
  """mean((x̂ − x)²) over all elements (torch's `nn.MSELoss()`)."""
  diff = reconstruction.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(diff * diff)


def perceptual_loss(lpips_fn: DistanceFn, reconstruction: jax.Array, target: jax.Array) -> jax.Array:
  """LPIPS(x̂, x) averaged over the batch."""
  d = lpips_fn(reconstruction, target)
  if d.ndim != 1 or d.shape[0] != reconstruction.shape[0]:
    raise ValueError(f"lpips_fn must return one distance per image, shape ({reconstruction.shape[0]},), "
                     f"got {d.shape}")
  return jnp.mean(d.astype(jnp.float32))


def nll_loss(lpips_fn: DistanceFn, reconstruction: jax.Array, target: jax.Array,
             perceptual_weight: float = 1.0) -> jax.Array:
  """pixel_mse + perceptual_weight·LPIPS: the L_nll whose gradient sets the adaptive GAN weight."""
  return (pixel_mse(reconstruction, target)
          + perceptual_weight * perceptual_loss(lpips_fn, reconstruction, target))
