"""Next-token selection from logits: greedy, temperature, top-k, top-p (pure functions).

Every knob may be a traced scalar, so a server changing temperature or nucleus size between
requests reuses one compiled decoding loop. Conventions: temperature 0 is greedy, top_k 0
keeps every token, top_p 1 keeps every token. Filters apply in HF's order: temperature,
top-k, top-p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -jnp.inf


def top_k_filter(logits, k):
  """Keeps the k largest logits of each row (ties with the k-th are kept), the rest -inf.
  k <= 0 (or >= vocabulary) keeps all."""
  v = logits.shape[-1]
  k = jnp.where((k <= 0) | (k > v), v, k)
  descending = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
  kth = jnp.take_along_axis(descending, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None],
                            axis=-1)
  return jnp.where(logits < kth, _MASKED, logits)


def top_p_filter(logits, p):
  """Nucleus filter: keeps the smallest set of most likely tokens whose probability reaches p
  (always at least the most likely one), the rest -inf. p >= 1 keeps all."""
  descending = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
  probs = jax.nn.softmax(descending, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
  keep = (mass_before < p) | (p >= 1.0)
  cutoff = jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, _MASKED, logits)


def sample(logits, rng, temperature=0.0, top_k=0, top_p=1.0):
  """(B, V) logits -> (B,) int32 tokens. Greedy (argmax, first on ties) when temperature is 0;
  only the chosen branch runs."""

  def greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def stochastic(logits):
    scaled = logits.astype(jnp.float32) / temperature
    filtered = top_p_filter(top_k_filter(scaled, top_k), top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)

  return jax.lax.cond(jnp.asarray(temperature) > 0, stochastic, greedy, logits)


def check_options(temperature, top_k, top_p) -> tuple[float, int, float]:
  """Validates user options (None = off) into the numeric conventions above."""
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
  return (float(temperature), 0 if top_k is None else int(top_k),
          1.0 if top_p is None else float(top_p))
