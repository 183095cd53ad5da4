"""Residual vector quantisation maths (RQ-VAE style), as pure functions.

Shapes: vectors are flattened to (N, d); a codebook is (K, d); codes are (N, D) for depth D,
coarse to fine. Distances, argmins and sums are float32 whatever the model's compute dtype.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST  # true fp32 matmuls on TPU too (default there is bf16 passes)


def nearest_code(x: jax.Array, codebook: jax.Array, chunk: int = 2048) -> jax.Array:
  """Index of the nearest codebook row for each row of `x`, by squared L2 distance.

  Distances are ‖x‖² + ‖e‖² − 2 x·e (the reference's formula, so near-ties resolve alike),
  computed `chunk` codebook rows at a time: peak memory O(N·chunk + K·d), never O(N·K).
  Ties go to the lowest index, as torch.argmin does.
  """
  x = x.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  k, d = codebook.shape
  x_sq = jnp.sum(x * x, axis=1, keepdims=True)
  e_sq = jnp.sum(codebook * codebook, axis=1)
  if chunk >= k:
    dist = (x_sq + e_sq[None]) - 2.0 * jnp.dot(x, codebook.T, precision=HIGHEST)
    return jnp.argmin(dist, axis=1).astype(jnp.int32)

  n_chunks = -(-k // chunk)
  pad = n_chunks * chunk - k
  codebook = jnp.pad(codebook, ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)
  e_sq = jnp.pad(e_sq, (0, pad), constant_values=jnp.inf).reshape(n_chunks, chunk)
  offsets = jnp.arange(n_chunks, dtype=jnp.int32) * chunk

  def scan_chunk(best, chunk_data):
    best_dist, best_idx = best
    rows, rows_sq, offset = chunk_data
    dist = (x_sq + rows_sq[None]) - 2.0 * jnp.dot(x, rows.T, precision=HIGHEST)
    idx = jnp.argmin(dist, axis=1)
    d_min = jnp.take_along_axis(dist, idx[:, None], axis=1)[:, 0]
    better = d_min < best_dist  # strict: an earlier chunk wins ties
    return (jnp.where(better, d_min, best_dist),
            jnp.where(better, idx.astype(jnp.int32) + offset, best_idx)), None

  init = (jnp.full((x.shape[0],), jnp.inf, jnp.float32), jnp.zeros((x.shape[0],), jnp.int32))
  (_, best_idx), _ = jax.lax.scan(scan_chunk, init, (codebook, e_sq, offsets))
  return best_idx


class RVQResult(NamedTuple):
  codes: jax.Array          # (N, D) int32
  partial_sums: jax.Array   # (D, N, d): a_d = q_1 + ... + q_d
  level_inputs: jax.Array   # (D, N, d): r_{d-1}, the residual each level quantised
  final_residual: jax.Array  # (N, d): r_D


# A per-level hook: (level, residual r_{d-1}, codes k_d) -> codebook for the next level.
LevelHook = Callable[[int, jax.Array, jax.Array], jax.Array]


def residual_quantize(z: jax.Array, codebook: jax.Array, depth: int, chunk: int = 2048,
                      after_level: LevelHook | None = None,
                      nearest: Callable[[jax.Array, jax.Array], jax.Array] | None = None
                      ) -> RVQResult:
  """Quantises `z` (N, d) in `depth` residual steps with one shared codebook.

  Level d picks k_d = argmin ‖r_{d−1} − e_k‖, emits q_d = e_{k_d} from the table it searched,
  and hands the next level r_d = r_{d−1} − q_d. `after_level`, if given, returns the table the
  next level uses (the pixel branch's per-level EMA update). `nearest(x, codebook)`, if given,
  replaces `nearest_code(x, codebook, chunk)` (e.g. the fused Pallas kernel, `pallas_nearest.py`).
  No gradient flows through here.
  """
  residual = jax.lax.stop_gradient(z).astype(jnp.float32)
  total = jnp.zeros_like(residual)
  codes, sums, inputs = [], [], []
  for level in range(depth):
    idx = nearest_code(residual, codebook, chunk) if nearest is None else nearest(residual, codebook)
    q = jnp.take(codebook, idx, axis=0).astype(jnp.float32)
    inputs.append(residual)
    if after_level is not None:
      codebook = after_level(level, residual, idx)
    residual = residual - q
    total = total + q
    codes.append(idx)
    sums.append(total)
  return RVQResult(jnp.stack(codes, axis=-1), jnp.stack(sums), jnp.stack(inputs), residual)


def straight_through(z: jax.Array, quantized: jax.Array) -> jax.Array:
  """Forward value `quantized`, gradient of the identity w.r.t. `z`."""
  return z + jax.lax.stop_gradient(quantized.astype(z.dtype) - z)


def commitment_loss(z: jax.Array, partial_sums: jax.Array) -> jax.Array:
  """The "cumsum" commitment loss: mean over levels of mean((z − sg(a_d))²). Trains the encoder only."""
  z = z.astype(jnp.float32)
  err = z[None] - jax.lax.stop_gradient(partial_sums)
  return jnp.mean(jnp.mean(err * err, axis=tuple(range(1, err.ndim))))


def embed_codes(codes: jax.Array, codebook: jax.Array) -> jax.Array:
  """(..., D) codes -> (..., D, d) per-depth embeddings; their sum over D is the quantised vector."""
  return jnp.take(codebook, codes, axis=0)
