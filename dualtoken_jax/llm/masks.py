"""Boolean attention masks (B, T, S) and token positions for the decoder: pure functions.

`mask[b, i, j]` is True when query i may attend to key j. The decoder adds the sliding window
of local layers itself (from positions), so these helpers only express causality, padding and
prefix-LM blocks. Positions count valid tokens only, so left- or right-padded rows get the same
RoPE phases as the unpadded sequence.
"""

from __future__ import annotations

import jax.numpy as jnp


def causal_mask(batch: int, length: int) -> jnp.ndarray:
  """Every query sees itself and earlier keys: (B, T, T)."""
  m = jnp.tril(jnp.ones((length, length), bool))
  return jnp.broadcast_to(m, (batch, length, length))


def causal_padding_mask(input_mask: jnp.ndarray) -> jnp.ndarray:
  """Causal attention among valid tokens; `input_mask` (B, T) is True on real tokens.

  Works for left and right padding alike. Queries on padding still see valid earlier keys
  (so no row is fully masked); their outputs are meaningless and should be ignored.
  """
  input_mask = jnp.asarray(input_mask, bool)
  t = input_mask.shape[1]
  return jnp.tril(jnp.ones((t, t), bool))[None] & input_mask[:, None, :]


def make_attn_mask(input_mask: jnp.ndarray, mask_ar: jnp.ndarray) -> jnp.ndarray:
  """PaliGemma's prefix-LM mask: query i may attend key j iff cumsum(mask_ar)[j] <= [i].

  `mask_ar[j] = 0` puts token j in the previous block (bidirectional within a block, e.g. the
  image and prefix), `1` starts a new causal step. Both arrays are (B, T); keys must be valid.
  """
  input_mask = jnp.asarray(input_mask, bool)
  cumsum = jnp.cumsum(jnp.asarray(mask_ar, jnp.int32), axis=1)
  return (cumsum[:, None, :] <= cumsum[:, :, None]) & input_mask[:, None, :]


def positions_from_mask(input_mask: jnp.ndarray) -> jnp.ndarray:
  """RoPE positions (B, T): the index of each valid token among its row's valid tokens; 0 on
  padding before the first one."""
  input_mask = jnp.asarray(input_mask, bool)
  return jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=1) - 1, 0)


def pad_keys(mask: jnp.ndarray, cache_size: int) -> jnp.ndarray:
  """A (B, T, T) prefill mask widened to (B, T, cache_size) cache slots (new slots hidden)."""
  t = mask.shape[-1]
  if cache_size < t:
    raise ValueError(f"cache_size {cache_size} is shorter than the {t} tokens to prefill")
  return jnp.pad(mask, ((0, 0), (0, 0), (0, cache_size - t)))


def decode_step_mask(valid_slots: jnp.ndarray, slot) -> jnp.ndarray:
  """Mask (B, 1, S) of a single new token written at cache `slot`: it sees every valid slot up
  to and including its own. `valid_slots` (B, S) marks slots holding real (non-pad) tokens."""
  s = valid_slots.shape[1]
  return (valid_slots & (jnp.arange(s) <= slot)[None, :])[:, None, :]
