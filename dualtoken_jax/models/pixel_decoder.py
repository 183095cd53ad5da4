"""The pixel decoder: `PostQuantResnetBlock` and a taming/VQGAN-style CNN `Decoder` (NHWC).

Submodule names follow taming (`conv_in`, `mid/{block_1,attn_1,block_2}`,
`up_{i}/{block_{j},attn_{j},upsample/conv}`, `norm_out`, `conv_out`), so reference weights map
by name. GroupNorm has 32 groups and eps 1e-6; convolutions pad like PyTorch (explicit, symmetric);
the output is linear (no tanh), nominally in [-1, 1]. Every conv runs `conv_impl`
(`models/conv.py`: XLA's convolution or a GEMM formulation; the parameters are nn.Conv's either way).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtoken_jax.models import conv as conv_impls

Dtype = Any


def conv(features: int, kernel: int, dtype: Dtype, name: str,
         impl: str = conv_impls.DEFAULT) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype, name=name,
                 conv_general_dilated=conv_impls.conv_fn(impl))


def group_norm(dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """GN -> SiLU -> conv3x3 -> GN -> SiLU -> dropout -> conv3x3, plus a 1x1 shortcut if widths differ."""
  out_channels: int
  dropout: float = 0.0
  first_kernel: int = 3  # PostQuantResnetBlock uses a 1x1 first conv
  dtype: Dtype = jnp.float32
  conv_impl: str = conv_impls.DEFAULT

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.silu(group_norm(self.dtype, "norm1")(x))
    h = conv(self.out_channels, self.first_kernel, self.dtype, "conv1", self.conv_impl)(h)
    h = nn.silu(group_norm(self.dtype, "norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_channels, 3, self.dtype, "conv2", self.conv_impl)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, "nin_shortcut", self.conv_impl)(x)
    return x + h


PostQuantResnetBlock = functools.partial(ResnetBlock, first_kernel=1)


class AttnBlock(nn.Module):
  """Single-head spatial self-attention over H*W with 1x1-conv q/k/v/proj_out, residual."""
  dtype: Dtype = jnp.float32
  conv_impl: str = conv_impls.DEFAULT

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    h = group_norm(self.dtype, "norm")(x)
    q, k, v = (conv(c, 1, self.dtype, n, self.conv_impl)(h).reshape(b, hh * ww, c)
               for n in ("q", "k", "v"))
    w = jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum("bqk,bkc->bqc", w, v).reshape(b, hh, ww, c)
    return x + conv(c, 1, self.dtype, "proj_out", self.conv_impl)(h)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then conv3x3."""
  dtype: Dtype = jnp.float32
  conv_impl: str = conv_impls.DEFAULT

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(x.shape[-1], 3, self.dtype, "conv", self.conv_impl)(x)


class MidBlock(nn.Module):
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  conv_impl: str = conv_impls.DEFAULT

  @nn.compact
  def __call__(self, x, train=False):
    c = x.shape[-1]
    i = self.conv_impl
    x = ResnetBlock(c, self.dropout, dtype=self.dtype, conv_impl=i, name="block_1")(x, train)
    x = AttnBlock(self.dtype, conv_impl=i, name="attn_1")(x)
    return ResnetBlock(c, self.dropout, dtype=self.dtype, conv_impl=i, name="block_2")(x, train)


class UpLevel(nn.Module):
  """One resolution level: num_res_blocks+1 ResnetBlocks (each followed by attention if
  `attention`), then Upsample unless it is the last (finest) level."""
  out_channels: int
  num_blocks: int
  attention: bool
  upsample: bool
  dropout: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  conv_impl: str = conv_impls.DEFAULT

  @nn.compact
  def __call__(self, x, train=False):
    # Remat recomputes a block in the backward pass: at 384 px the full-resolution levels'
    # activations dominate training memory.
    block = nn.remat(ResnetBlock, static_argnums=(2,)) if self.remat else ResnetBlock
    attn = nn.remat(AttnBlock) if self.remat else AttnBlock
    for j in range(self.num_blocks):
      x = block(self.out_channels, self.dropout, dtype=self.dtype, conv_impl=self.conv_impl,
                name=f"block_{j}")(x, train)
      if self.attention:
        x = attn(self.dtype, conv_impl=self.conv_impl, name=f"attn_{j}")(x)
    if self.upsample:
      x = Upsample(self.dtype, conv_impl=self.conv_impl, name="upsample")(x)
    return x


class Decoder(nn.Module):
  """(B, r, r, in_channels) latent -> (B, r*2**(L-1), ..., out_ch) image, L = len(ch_mult)."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  out_ch: int = 3
  dropout: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  conv_impl: str = conv_impls.DEFAULT  # a models/conv.py IMPLS name

  @nn.compact
  def __call__(self, z, train: bool = False):
    levels = len(self.ch_mult)
    res = z.shape[1]
    h = conv(self.ch * self.ch_mult[-1], 3, self.dtype, "conv_in", self.conv_impl)(z.astype(self.dtype))
    h = MidBlock(self.dtype, self.dropout, self.conv_impl, name="mid")(h, train)
    for i in reversed(range(levels)):  # coarse to fine; `up_{i}` keeps taming's level index
      h = UpLevel(self.ch * self.ch_mult[i], self.num_res_blocks + 1,
                  attention=res in self.attn_resolutions, upsample=i != 0, dropout=self.dropout,
                  remat=self.remat, dtype=self.dtype, conv_impl=self.conv_impl,
                  name=f"up_{i}")(h, train)
      res = res * 2 if i != 0 else res
    h = nn.silu(group_norm(self.dtype, "norm_out")(h))
    # The adaptive GAN weight needs gradients w.r.t. conv_out's kernel; with its input at hand
    # they cost one small vjp instead of a second pass through the decoder.
    self.sow("intermediates", "conv_out_input", h)
    return conv(self.out_ch, 3, self.dtype, "conv_out", self.conv_impl)(h)


def apply_conv_out(params, h, out_ch: int = 3, conv_impl: str = conv_impls.DEFAULT):
  """The decoder's last conv as a function of its params {"kernel", "bias"} and input `h`."""
  return conv(out_ch, 3, h.dtype, "conv_out", conv_impl).apply({"params": params}, h)


def resize_latent(x, shape):
  """Half-pixel bilinear resize without antialiasing (= torch interpolate, align_corners=False)."""
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, shape[0], shape[1], c), "bilinear", antialias=False)
