"""EMA codebook updates with dead-code restart, as pure functions.

State per codebook (a dict, stored in the `vq_stats` collection, never in `params`):
  codebook (K, d)     the table searched and embedded;
  cluster_size (K,)   EMA of assignment counts N_k;
  embed_sum (K, d)    EMA of assigned-vector sums S_k.

One `ema_step` = counts/sums of the assigned vectors (summed over data-parallel replicas) →
decay → restart codes with N_k < 1 from random batch vectors → Laplace-smoothed table write.
Counts and sums use segment sums, never a K×N one-hot.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

AxisNames = str | Sequence[str] | None


def cluster_statistics(vectors: jax.Array, codes: jax.Array, codebook_size: int,
                       axis_name: AxisNames = None):
  """(n_k, s_k): how many vectors picked code k and their sum. Under `jax.jit` with sharded
  inputs the sums are global already; inside `shard_map`/`pmap` pass `axis_name` to psum them."""
  vectors = vectors.astype(jnp.float32)
  counts = jax.ops.segment_sum(jnp.ones_like(codes, jnp.float32), codes, codebook_size)
  sums = jax.ops.segment_sum(vectors, codes, codebook_size)
  if axis_name is not None:
    counts, sums = jax.lax.psum((counts, sums), axis_name)
  return counts, sums


def restart_candidates(vectors: jax.Array, codebook_size: int, key: jax.Array,
                       axis_name: AxisNames = None) -> jax.Array:
  """K random batch vectors (a random permutation's first K). With fewer than K vectors the batch
  is tiled and jittered by U[0, 0.01/√d), as the reference does. Every replica draws the same:
  the key is shared and, inside shard_map/pmap, the vectors are all-gathered first."""
  if axis_name is not None:
    vectors = jax.lax.all_gather(vectors, axis_name, tiled=True)
  n, d = vectors.shape
  noise_key, perm_key = jax.random.split(key)
  if n < codebook_size:
    repeats = -(-codebook_size // n)
    vectors = jnp.tile(vectors, (repeats, 1))
    vectors = vectors + jax.random.uniform(noise_key, vectors.shape) * (0.01 / d**0.5)
  perm = jax.random.permutation(perm_key, vectors.shape[0])[:codebook_size]
  return jnp.take(vectors, perm, axis=0)


def smoothed_codebook(cluster_size: jax.Array, embed_sum: jax.Array, eps: float) -> jax.Array:
  """e_k = S_k / Ñ_k with Laplace smoothing Ñ_k = n·(N_k + ε)/(n + K·ε), n = Σ N_k."""
  k = cluster_size.shape[0]
  n = jnp.sum(cluster_size)
  normalized = n * (cluster_size + eps) / (n + k * eps)
  return embed_sum / normalized[:, None]


def ema_step(state: dict, vectors: jax.Array, codes: jax.Array, *, decay: float, eps: float,
             restart_key: jax.Array | None, axis_name: AxisNames = None) -> dict:
  """One EMA update of `state` from `vectors` (N, d) assigned to `codes` (N,).

  `restart_key=None` disables dead-code restart (used for deterministic reference checks).
  """
  k = state["cluster_size"].shape[0]
  vectors = vectors.reshape(-1, vectors.shape[-1]).astype(jnp.float32)
  codes = codes.reshape(-1)
  counts, sums = cluster_statistics(vectors, codes, k, axis_name)
  cluster_size = decay * state["cluster_size"] + (1 - decay) * counts
  embed_sum = decay * state["embed_sum"] + (1 - decay) * sums
  if restart_key is not None:
    candidates = restart_candidates(vectors, k, restart_key, axis_name)
    dead = cluster_size < 1.0
    embed_sum = jnp.where(dead[:, None], candidates, embed_sum)
    cluster_size = jnp.where(dead, 1.0, cluster_size)
  return dict(codebook=smoothed_codebook(cluster_size, embed_sum, eps),
              cluster_size=cluster_size, embed_sum=embed_sum)
