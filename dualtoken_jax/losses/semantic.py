"""Semantic distillation from the frozen SigLIP teacher (spec B.2/B.3), as pure functions.

Each term is MSE − cos between a student feature and the teacher's: MSE is the elementwise mean,
cos the cosine along the feature (last) axis averaged over tokens and batch (torch's
`F.cosine_similarity(..., dim=-1).mean()`). Two pairs enter: the post-quant semantic tokens
`zq_sem` against the teacher's block-26 output, and the MAP-head output against the teacher's
pooled embedding. The teacher side is always stop-gradient'ed; everything is float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

COS_EPS = 1e-8  # F.cosine_similarity's default


class SemanticWeights(NamedTuple):
  """Weights of the four terms: loss = Σ w_mse·MSE − w_cos·cos over the token and pooled pairs."""
  token_mse: float
  token_cos: float
  pool_mse: float
  pool_cos: float


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = COS_EPS) -> jax.Array:
  """Cosine along the last axis; each norm is clamped below at `eps`, as torch does.

  max(‖a‖, eps) is computed as sqrt(max(‖a‖², eps²)) so that a zero vector has a zero, not NaN,
  gradient through its norm.
  """
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1), eps * eps))
  nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=-1), eps * eps))
  return jnp.sum(a * b, axis=-1) / (na * nb)


def mse(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """mean((s − sg(t))²) over all elements."""
  diff = student.astype(jnp.float32) - jax.lax.stop_gradient(teacher).astype(jnp.float32)
  return jnp.mean(diff * diff)


def mean_cosine(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """mean over all leading axes of cos(s, sg(t)) along the feature axis."""
  return jnp.mean(cosine_similarity(student, jax.lax.stop_gradient(teacher)))


def semantic_loss(zq_sem: jax.Array, teacher_tokens: jax.Array, pooled: jax.Array,
                  teacher_pooled: jax.Array, weights: SemanticWeights
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted semantic term and its four parts (for logging).

  Args:
    zq_sem: (B, N, C) student semantic tokens after quantisation and PostQuantSem.
    teacher_tokens: (B, N, C) the teacher's block-26 output (T26).
    pooled: (B, C) the student's MAP-head output.
    teacher_pooled: (B, C) the teacher's pooled embedding.
    weights: term weights; those of stage s are `tokenizer_training.recipe.loss_config(s)`.
  Returns:
    (loss, {"token_mse", "token_cos", "pool_mse", "pool_cos"}), cos being the similarity itself.
  """
  if zq_sem.shape != teacher_tokens.shape or pooled.shape != teacher_pooled.shape:
    raise ValueError(f"student/teacher shapes differ: tokens {zq_sem.shape} vs {teacher_tokens.shape}, "
                     f"pooled {pooled.shape} vs {teacher_pooled.shape}")
  parts = {
      "token_mse": mse(zq_sem, teacher_tokens),
      "token_cos": mean_cosine(zq_sem, teacher_tokens),
      "pool_mse": mse(pooled, teacher_pooled),
      "pool_cos": mean_cosine(pooled, teacher_pooled),
  }
  w = weights
  loss = (w.token_mse * parts["token_mse"] - w.token_cos * parts["token_cos"]
          + w.pool_mse * parts["pool_mse"] - w.pool_cos * parts["pool_cos"])
  return loss, parts
