"""Decoder attention: RMSNorm, RoPE, grouped-query attention with soft-cap, sliding window,
optional q/k/v biases and an optional KV cache (Gemma, Qwen2, Llama: the differences are config
data).

Maths are pure functions (`rms_norm`, `apply_rope`, `dot_product_attention`); the Linen
modules only own parameters, named as in the official Gemma Flax checkpoints
(`attn/q_einsum/w` (N, D, H), `attn/kv_einsum/w` (2, K, D, H) or `attn/qkv_einsum/w`
(3, N, D, H), `attn/attn_vec_einsum/w` (N, H, D), `attn/_query_norm`, `attn/_key_norm`);
with `qkv_bias` the projections also hold `b`: `q_einsum/b` (N, H), `kv_einsum/b` (2, K, H),
`qkv_einsum/b` (3, N, H).
Per-layer choices that differ between layers (window, RoPE base and scale) are call arguments,
not attributes, so a scanned stack feeds them as scan inputs without Python branches.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtoken_jax.llm import config as C
from dualtoken_jax.models import attention as attention_impls
from dualtoken_jax.models import partitioning as P

# Masked logits (gm/big_vision value): finite, so fully masked rows cannot produce NaNs.
NEG_INF = -2.3819763e38


# ---------------------------------------------------------------- pure maths
def rms_norm(x, scale, eps: float, offset: float = 1.0):
  """RMSNorm in float32: x / rms(x) * (offset + scale). Gemma stores `scale` as an offset from
  1 (offset 1); Qwen2 / Llama store the weight itself (offset 0)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * (offset + scale.astype(jnp.float32))).astype(x.dtype)


def rope_inv_freq(h: int, base, llama3=None):
  """(h/2,) float32 inverse frequencies base^(-2i/h), with Llama 3's frequency-dependent
  scaling when `llama3` = (factor, low_freq_factor, high_freq_factor, original_context)."""
  inv_freq = 1.0 / (jnp.asarray(base, jnp.float32) ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  if llama3 is None:
    return inv_freq
  factor, low, high, context = (float(v) for v in llama3)
  wavelen = 2 * jnp.pi / inv_freq
  scaled = jnp.where(wavelen > context / low, inv_freq / factor, inv_freq)
  smooth = (context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < context / high) & ~(wavelen > context / low)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x, positions, base, scale=1.0, llama3=None):
  """Rotary embedding on the two halves of the last axis ("rotate half", not interleaved pairs;
  the layout of Gemma, Qwen2 and Llama in HF).

  x: (B, T, N, H); positions: (B, T) int. `base` and `scale` may be traced scalars (per-layer
  scan inputs); `scale` > 1 is linear position interpolation (Gemma 3 global layers, Llama
  "linear"); `llama3` is Llama 3's static frequency scaling (see `rope_inv_freq`).
  """
  h = x.shape[-1]
  inv_freq = rope_inv_freq(h, base, llama3)
  angle = positions.astype(jnp.float32)[..., None] * (inv_freq / scale)  # (B, T, H/2)
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def window_mask(mask, q_positions, k_positions, window):
  """Restricts `mask` (B, T, S) to keys within `window` positions of the query (|dq - dk| <
  window, bidirectional as in gm). `window` may be traced; NO_WINDOW leaves the mask as is."""
  dist = jnp.abs(q_positions[:, :, None] - k_positions[:, None, :])
  return mask & (dist < window)


def dot_product_attention(q, k, v, mask, softcap=None):
  """Grouped-query attention. q: (B, T, N, H), already scaled; k, v: (B, S, K, H) with N a
  multiple of K (query head n uses kv head n // (N/K)); mask: (B, T, S) bool.

  Logits and softmax run in float32; the output has q's dtype.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask[:, None, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)


# ---------------------------------------------------------------- modules
def fan_in_init(in_axis, out_axis, batch_axis=()):
  """Lecun-normal over the named fan-in axes of an einsum weight."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=batch_axis)


class RMSNorm(nn.Module):
  """`scale` (features,), initialised to the identity (0 with Gemma's offset 1, else 1)."""
  eps: float = 1e-6
  param_dtype: Any = jnp.float32
  offset: float = 1.0

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.constant(1.0 - self.offset)
    scale = self.param("scale", P.boxed(init, ("norm",)), (x.shape[-1],), self.param_dtype)
    return rms_norm(x, scale, self.eps, self.offset)


class Einsum(nn.Module):
  """A weight `w` of `shape` with logical axis `names`, applied by an einsum equation; with
  `bias_axes` (axes of `w` kept, e.g. heads and head_dim) also a zero-initialised bias `b`
  added to the output."""
  shape: tuple[int, ...]
  names: tuple[str | None, ...]
  init: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bias_axes: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, eqn: str, x):
    w = self.param("w", P.boxed(self.init, self.names), self.shape, self.param_dtype)
    y = jnp.einsum(eqn, x, w.astype(self.dtype))
    if self.bias_axes is None:
      return y
    axes = tuple(self.bias_axes)
    b = self.param("b", P.boxed(nn.initializers.zeros, tuple(self.names[i] for i in axes)),
                   tuple(self.shape[i] for i in axes), self.param_dtype)
    w_spec, out_spec = eqn.split(",")[1].split("->")
    letters = {w_spec[i]: self.shape[i] for i in axes}  # bias letters appear in out_spec in order
    return y + b.astype(self.dtype).reshape([letters.get(l, 1) for l in out_spec])


class Attention(nn.Module):
  """Self-attention of one layer; `config` is the (frozen) decoder config."""
  config: Any

  @nn.compact
  def __call__(self, x, positions, k_positions, mask, window, rope_base, rope_scale,
               kv_cache=None, cache_index=None):
    """x: (B, T, D); positions: (B, T); mask: (B, T, S).

    Without a cache S == T and `k_positions` is `positions`. With `kv_cache` = (k, v), each
    (B, S, K, H), the new keys/values are written at slots [cache_index, cache_index + T) and
    attention runs over all S slots (`k_positions` (B, S) are the slots' token positions).
    Returns (output (B, T, D), the updated (k, v) cache or None).
    """
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    d, n, kh, h = c.width, c.num_heads, c.num_kv_heads, c.head_dim
    einsum = lambda shape, names, init, name, bias=None: Einsum(
        shape, names, init, dtype, pdtype, bias if c.qkv_bias else None, name=name)
    if C.uses_qkv_einsum(c):
      qkv = einsum((3, n, d, h), (None, "heads", "embed", "kv"), fan_in_init(2, (1, 3), 0),
                   "qkv_einsum", (0, 1, 3))("btd,cndh->cbtnh", x)
      q, k, v = qkv[0], qkv[1], qkv[2]
    else:
      q = einsum((n, d, h), ("heads", "embed", "kv"), fan_in_init(1, (0, 2)),
                 "q_einsum", (0, 2))("btd,ndh->btnh", x)
      kv = einsum((2, kh, d, h), (None, "kv_heads", "embed", "kv"), fan_in_init(2, (1, 3), 0),
                  "kv_einsum", (0, 1, 3))("btd,ckdh->cbtkh", x)
      k, v = kv[0], kv[1]
    if c.qk_norm:
      q = RMSNorm(c.norm_eps, pdtype, c.norm_offset, name="_query_norm")(q)
      k = RMSNorm(c.norm_eps, pdtype, c.norm_offset, name="_key_norm")(k)
    llama3 = None if c.rope_llama3 is None else tuple(c.rope_llama3)
    q = apply_rope(q, positions, rope_base, rope_scale, llama3)
    k = apply_rope(k, positions, rope_base, rope_scale, llama3)
    q = q * jnp.asarray(c.query_pre_attn_scalar ** -0.5, dtype)

    new_cache = None
    if kv_cache is not None:
      k_cache, v_cache = kv_cache
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
      new_cache = (k, v)
    mask = window_mask(mask, positions, k_positions, window)
    if c.attention_impl == "chunked":
      out = dot_product_attention(q, k.astype(dtype), v.astype(dtype), mask, c.attn_logit_softcap)
    else:  # queries are already scaled
      out = attention_impls.attend(q, k.astype(dtype), v.astype(dtype), impl=c.attention_impl,
                                   mask=mask[:, None], scale=1.0, interpret=c.pallas_interpret,
                                   field="llm.attention_impl")
    out = einsum((n, h, d), ("heads", "kv", "embed"), fan_in_init((0, 1), 2),
                 "attn_vec_einsum")("btnh,nhd->btd", out)
    return out, new_cache
