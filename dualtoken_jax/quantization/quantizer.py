"""`ResidualQuantizer`: the Linen wrapper around the RVQ maths and its EMA codebook.

The table and its EMA statistics live in the `vq_stats` collection (`codebook`, `cluster_size`,
`embed_sum`), outside `params`, so optimisers never see them and checkpoints keep them. Training
mode (`train=True`, `mutable=["vq_stats"]`, an rng stream "vq" for restarts) updates them:

* ema_update="per_level" (the reference's pixel "rq"): one EMA step inside every depth level, on that
  level's residuals; level d+1 already searches the updated table. D steps per forward.
* ema_update="pooled" (the reference's semantic "rq_ema"): all levels search the same table and the
  (r_{d−1}, k_d) pairs of all levels feed one EMA step at the end.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtoken_jax.quantization import codebook_ema
from dualtoken_jax.quantization import pallas_nearest
from dualtoken_jax.quantization import residual as rvq

COLLECTION = "vq_stats"
RNG_STREAM = "vq"


class QuantizerOutput(NamedTuple):
  quantized: jax.Array  # (..., d) straight-through: value a_D, gradient to the input
  codes: jax.Array      # (..., D) int32
  loss: jax.Array       # scalar commitment loss


class ResidualQuantizer(nn.Module):
  codebook_size: int
  embed_dim: int
  depth: int
  decay: float = 0.99
  eps: float = 1e-5
  restart_unused_codes: bool = True
  ema_update: str = "per_level"
  reference_aliasing_bug: bool = False
  distance_chunk: int = 2048
  nearest_code_impl: str = "xla"  # pallas_nearest.IMPLS ("auto": the fused kernel on GPU/TPU)
  pallas_interpret: bool = False   # the Pallas kernel in its interpreter, on any backend (tests)
  axis_name: str | tuple[str, ...] | None = None  # set only inside shard_map/pmap

  def setup(self):
    self.codebook = self.variable(
        COLLECTION, "codebook",
        lambda: jax.random.normal(self.make_rng("params"), (self.codebook_size, self.embed_dim)))
    self.cluster_size = self.variable(
        COLLECTION, "cluster_size", lambda: jnp.zeros((self.codebook_size,), jnp.float32))
    self.embed_sum = self.variable(COLLECTION, "embed_sum", lambda: self.codebook.value)

  def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
    if z.shape[-1] != self.embed_dim:
      raise ValueError(f"quantizer expects vectors of size {self.embed_dim}, got shape {z.shape}")
    update = train and not self.is_initializing()
    if update and not self.is_mutable_collection(COLLECTION):
      raise ValueError(f"training-mode quantisation updates the EMA codebook: apply the model "
                       f"with mutable=[{COLLECTION!r}] (or train=False)")
    flat = z.reshape(-1, self.embed_dim)
    state = self._read_stats()
    keys = self._restart_keys(update)

    hook = None
    if update and self.ema_update == "per_level":
      def hook(level, residual, codes):
        nonlocal state
        state = self._ema(state, residual, codes, keys[level])
        return state["codebook"]

    nearest = functools.partial(pallas_nearest.search, impl=self.nearest_code_impl,
                                chunk=self.distance_chunk, interpret=self.pallas_interpret)
    result = rvq.residual_quantize(flat, state["codebook"], self.depth, self.distance_chunk, hook,
                                   nearest)
    if update and self.ema_update == "pooled":
      state = self._ema(state, self._pooled_vectors(result), result.codes.T, keys[0])
    if update:
      self._write_stats(state)

    quantized = rvq.straight_through(flat, result.partial_sums[-1]).reshape(z.shape)
    loss = rvq.commitment_loss(flat, result.partial_sums)
    return QuantizerOutput(quantized, result.codes.reshape(z.shape[:-1] + (self.depth,)), loss)

  def embed(self, codes: jax.Array) -> jax.Array:
    """(..., D) codes -> (..., D, d) per-depth embeddings (sum over D = the quantised vector)."""
    if codes.shape[-1] != self.depth:
      raise ValueError(f"codes must have depth {self.depth} on the last axis, got shape {codes.shape}")
    return rvq.embed_codes(codes, self.codebook.value)

  def _pooled_vectors(self, result: rvq.RVQResult) -> jax.Array:
    if self.reference_aliasing_bug:
      # The reference caches views of a buffer it later updates in place: every level's
      # "residual" reads back as the final one. Kept only to resume reference runs exactly.
      return jnp.broadcast_to(result.final_residual, result.level_inputs.shape)
    return result.level_inputs

  def _ema(self, state, vectors, codes, key):
    return codebook_ema.ema_step(state, vectors, codes, decay=self.decay, eps=self.eps,
                                 restart_key=key, axis_name=self.axis_name)

  def _restart_keys(self, update):
    if not (update and self.restart_unused_codes):
      return [None] * self.depth
    return list(jax.random.split(self.make_rng(RNG_STREAM), self.depth))

  def _read_stats(self):
    return dict(codebook=self.codebook.value, cluster_size=self.cluster_size.value,
                embed_sum=self.embed_sum.value)

  def _write_stats(self, state):
    self.codebook.value = state["codebook"]
    self.cluster_size.value = state["cluster_size"]
    self.embed_sum.value = state["embed_sum"]
