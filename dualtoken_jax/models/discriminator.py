"""The reference's PatchGAN discriminator with GroupNorm residual blocks (NHWC).

  conv3×3/2(3 -> ndf) -> LeakyReLU(0.2)
  -> DResBlock(ndf -> 2ndf, /2) -> DResBlock(2ndf -> 4ndf, /2) -> DResBlock(4ndf -> 8ndf, /1)
  -> conv3×3/1(8ndf -> 1)

At 384² input that is a 48×48 logit map, ≈1.73 M parameters for ndf = 64. No BatchNorm, no
ActNorm. Convolutions pad 1 on every side as PyTorch does (Flax's 'SAME' pads stride-2 convs
asymmetrically, which shifts the sampling grid by one pixel). Conv weights start at N(0, 0.02) and
biases at PyTorch's default U(±1/√fan_in), as the reference's `weights_init` leaves them.
Names vs the reference's `main` Sequential: main.0 -> conv_in, main.{2,3,4} -> block_{0,1,2}
(each with norm1, conv1, nin_shortcut), main.5 -> conv_out.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtoken_jax.models.pixel_decoder import resize_latent

Dtype = Any

LEAKY_SLOPE = 0.2


def torch_bias_init(fan_in: int):
  """PyTorch's default Conv2d bias init: U(−1/√fan_in, 1/√fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(x: jax.Array, features: int, kernel: int, stride: int, dtype: Dtype, name: str) -> jax.Array:
  """Conv with symmetric padding kernel // 2 (PyTorch's `padding=k//2`) and the reference's init."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 dtype=dtype, kernel_init=nn.initializers.normal(0.02),
                 bias_init=torch_bias_init(x.shape[-1] * kernel * kernel), name=name)(x)


class DResBlock(nn.Module):
  """GN(32) -> LeakyReLU(0.2) -> conv3×3/stride, plus x bilinearly resized to the output's size
  (half-pixel, no antialias: torch `interpolate(..., 'bilinear', align_corners=False)`) and passed
  through a 1×1 conv when the widths differ."""
  out_channels: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, dtype=self.dtype, name="norm1")(x)
    h = conv(nn.leaky_relu(h, LEAKY_SLOPE), self.out_channels, 3, self.stride, self.dtype, "conv1")
    if x.shape[1:3] != h.shape[1:3]:
      x = resize_latent(x, h.shape[1:3])
    if x.shape[-1] != self.out_channels:
      x = conv(x, self.out_channels, 1, 1, self.dtype, "nin_shortcut")
    return x + h


class PatchDiscriminator(nn.Module):
  """(B, H, W, 3) images in [-1, 1] -> (B, ⌈H/8⌉, ⌈W/8⌉, 1) float32 logits (for n_layers = 3).

  Block n < n_layers widens to ndf·min(2ⁿ, 8) and halves the resolution; the last block widens to
  ndf·min(2^n_layers, 8) at stride 1. Widths must be multiples of 32 (GroupNorm).
  """
  ndf: int = 64
  n_layers: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.ndf % 32:
      raise ValueError(f"ndf must be a multiple of 32 (GroupNorm with 32 groups), got {self.ndf}")
    h = nn.leaky_relu(conv(x.astype(self.dtype), self.ndf, 3, 2, self.dtype, "conv_in"), LEAKY_SLOPE)
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      h = DResBlock(self.ndf * min(2 ** n, 8), stride, self.dtype, name=f"block_{n - 1}")(h)
    return conv(h, 1, 3, 1, self.dtype, "conv_out").astype(jnp.float32)
