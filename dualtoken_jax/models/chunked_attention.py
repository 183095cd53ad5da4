"""Attention evaluated a block of queries at a time: the same numbers, a fraction of the memory.

Each query's softmax runs over all keys, so splitting the *queries* into blocks changes nothing
in the result (no online softmax needed). At 384 px the towers attend over 729 tokens with 16
(ViT) or 36 (the pre/post-quant projections) heads: one full (B, H, 729, 729) map in float32 is
1-2.3 GiB at 32 images per device, and a backward pass holds several. With `query_chunked` only a
(B, H, chunk, 729) slice exists at a time, forward and backward (each block is rematerialised).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def query_chunked(chunk: int, attention_fn: Callable = nn.dot_product_attention) -> Callable:
  """`attention_fn(query, key, value, bias=None, mask=None, **kw)` (Flax layout: queries on axis
  -3 of (..., q, heads, head_dim)) computed `chunk` queries at a time; `chunk` 0 = all at once."""
  if chunk <= 0:
    return attention_fn

  def attend(query, key, value, bias=None, mask=None, **kw):
    q_len = query.shape[-3]
    if q_len <= chunk:
      return attention_fn(query, key, value, bias=bias, mask=mask, **kw)
    n = -(-q_len // chunk)
    # Per-query arrays (queries, and bias/mask rows unless broadcast) are padded to n·chunk rows
    # and split into n blocks; the padded rows' outputs are dropped.
    per_query = lambda a, axis: a is not None and a.shape[axis] == q_len
    split = lambda a, axis: _blocks(a, axis, n, chunk)
    xs = (split(query, query.ndim - 3),
          split(bias, bias.ndim - 2) if per_query(bias, -2) else None,
          split(mask, mask.ndim - 2) if per_query(mask, -2) else None)

    def block(q, b, m):
      return attention_fn(q, key, value, bias=bias if b is None else b,
                          mask=mask if m is None else m, **kw)

    out = jax.lax.map(lambda x: jax.checkpoint(block, prevent_cse=False)(*x), xs)
    out = jnp.moveaxis(out, 0, out.ndim - 4)  # (..., n, chunk, heads, head_dim)
    out = out.reshape(out.shape[:-4] + (n * chunk,) + out.shape[-2:])
    return jax.lax.slice_in_dim(out, 0, q_len, axis=out.ndim - 3)

  return attend


def _blocks(a, axis: int, n: int, chunk: int):
  """Pads `a` along `axis` to n·chunk and moves the n blocks to a new leading axis."""
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, n * chunk - a.shape[axis])
  a = jnp.pad(a, pad)
  a = a.reshape(a.shape[:axis] + (n, chunk) + a.shape[axis + 1:])
  return jnp.moveaxis(a, axis, 0)
