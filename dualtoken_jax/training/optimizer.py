"""Optimisers, schedules and freezing for the trainers, as optax transforms.

Which parameters train is data: `config.trainable` / `config.frozen` are lists of regexes over
parameter paths ("img/Transformer/encoderblock_3/…", "llm/layer_3/…", always written per block).
Whole frozen leaves go to `optax.set_to_zero` through `optax.multi_transform`; a stacked (scanned)
leaf whose blocks are only partly frozen trains, and its frozen blocks' updates are zeroed
afterwards. Stacks are those of `bridges.layout.STACKS` (big_vision's `encoderblock`, the Gemma
decoder's `layers`).
Frozen parameters are therefore bitwise unchanged, weight decay included.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualtoken_jax.bridges import layout


def warmup_cosine(lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0,
                  warmup_from_zero: bool = False) -> optax.Schedule:
  """Linear warm-up then cosine decay to `end_lr`.

  The reference's generator warm-up is lr·(step+1)/warmup (never exactly 0); its discriminator
  warm-up starts from 0 (`warmup_from_zero=True`).
  """
  warmup_steps = max(int(warmup_steps), 1)
  start = 0.0 if warmup_from_zero else lr / warmup_steps
  span = warmup_steps if warmup_from_zero else warmup_steps - 1
  warm = optax.linear_schedule(start, lr, max(span, 1))
  cos = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1), alpha=end_lr / lr if lr else 0.0)
  return optax.join_schedules([warm, cos], [warmup_steps])


def trainable_masks(params: Any, trainable: Sequence[str] = (".*",),
                    frozen: Sequence[str] = ()) -> Any:
  """Per leaf: a bool array over its blocks (shape (L,) for stacked leaves, () otherwise) saying
  which blocks train. A path trains if it matches a `trainable` regex and no `frozen` one."""
  train_re = [re.compile(p) for p in trainable]
  frozen_re = [re.compile(p) for p in frozen]
  def mask(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    paths = layout.block_paths(name, tuple(leaf.shape))
    flags = [any(r.fullmatch(p) for r in train_re) and not any(r.fullmatch(p) for r in frozen_re)
             for p in paths]
    return np.array(flags) if layout.stack_of(name) else np.array(flags[0])
  return jax.tree_util.tree_map_with_path(mask, params)


def decay_mask(params: Any) -> Any:
  """Weight decay on weights of rank >= 2 only (not biases, norms, gains), per block."""
  def rank(path, leaf):
    stacked = layout.stack_of("/".join(str(getattr(k, "key", k)) for k in path)) is not None
    return (leaf.ndim - int(stacked)) >= 2
  return jax.tree_util.tree_map_with_path(rank, params)


def _zero_frozen_blocks(masks: Any) -> optax.GradientTransformation:
  """Multiplies each update by its per-block mask (broadcast over the block axis)."""
  def update(updates, state, params=None):
    del params
    def apply(u, m):
      if m.ndim == 0:
        return u
      return u * jnp.asarray(m, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
    return jax.tree.map(apply, updates, masks), state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def with_freezing(tx: optax.GradientTransformation, masks: Any) -> optax.GradientTransformation:
  """`tx` on trainable leaves, set_to_zero on frozen ones, block masks on partly frozen stacks."""
  labels = jax.tree.map(lambda m: "train" if np.any(m) else "frozen", masks)
  frozen_only = jax.tree.map(lambda m: m if (m.ndim and not m.all()) else np.array(True), masks)
  return optax.chain(
      optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels),
      _zero_frozen_blocks(frozen_only))


def adamw(schedule: optax.Schedule, *, b1: float, b2: float, eps: float, weight_decay: float,
          params: Any, grad_clip_norm: float | None = None) -> optax.GradientTransformation:
  """AdamW with decay on rank >= 2 weights only and optional global-norm clipping."""
  parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask(params)))
  return optax.chain(*parts)


def count_trainable(params: Any, masks: Any) -> tuple[int, int]:
  """(trainable, total) parameter counts."""
  total = trainable = 0
  for leaf, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
    size = int(np.prod(leaf.shape))
    total += size
    trainable += int(size * np.mean(m))  # a stacked leaf's blocks are equal-sized
  return trainable, total
