"""Name-and-layout rules between a foreign flat state dict and this project's param trees.

A `Rule` ties one or more foreign keys to zero or more of our paths ("img/embedding/kernel")
with a transform each way. Bridges build rule lists from the model's own abstract tree, so import
and export are the same table read in two directions, and strictness comes for free: every
foreign key must be claimed by a rule and every rule's key must be present, with the shape the
model expects, or `CheckpointError` lists all offenders at once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from dualtoken_jax.bridges.tensor_files import CheckpointError, tree_problems

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Rule:
  """Foreign tensors `foreign` <-> our flat paths `ours`; either side may hold several (a fused
  q/k/v tensor fills three of ours; k_proj and v_proj fill one `kv_einsum`) or none (a buffer)."""
  foreign: tuple[str, ...]              # keys in the foreign state dict
  ours: tuple[str, ...]                 # our flat paths they fill
  to_ours: Callable[..., tuple]         # foreign arrays -> arrays for `ours` (a check for buffers)
  to_foreign: Callable[..., tuple]      # arrays for `ours` -> foreign arrays
  shapes: tuple[tuple[int, ...], ...] | None = None  # the foreign arrays' shapes, if known


def one(foreign: str, ours: str, to_ours=lambda a: a, to_foreign=lambda a: a,
        shape: tuple[int, ...] | None = None) -> Rule:
  """One foreign tensor (of `shape`, if given) <-> one of ours."""
  return Rule((foreign,), (ours,), lambda a: (to_ours(a),), lambda a: (to_foreign(a),),
              None if shape is None else (tuple(shape),))


# ---------------------------------------------------------------- transforms (PyTorch <-> Flax)
def linear(foreign: str, ours: str) -> Rule:
  """nn.Linear weight (out, in) <-> Dense kernel (in, out)."""
  return one(foreign, ours, lambda a: a.T, lambda a: a.T)


def conv(foreign: str, ours: str) -> Rule:
  """Conv2d weight (O, I, H, W) <-> Flax kernel (H, W, I, O)."""
  return one(foreign, ours, lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))


def heads_in(foreign: str, ours: str, heads: int) -> Rule:
  """q/k/v Linear (H*hd, D) <-> DenseGeneral kernel (D, H, hd)."""
  return one(foreign, ours, lambda a: a.T.reshape(a.shape[1], heads, -1),
             lambda a: a.reshape(a.shape[0], -1).T)


def heads_bias(foreign: str, ours: str, heads: int) -> Rule:
  return one(foreign, ours, lambda a: a.reshape(heads, -1), lambda a: a.reshape(-1))


def heads_out(foreign: str, ours: str, heads: int) -> Rule:
  """out Linear (D, H*hd) <-> kernel (H, hd, D)."""
  return one(foreign, ours, lambda a: a.T.reshape(heads, -1, a.shape[0]),
             lambda a: a.reshape(-1, a.shape[-1]).T)


def fused_qkv(foreign: str, ours: Sequence[str], transform: Callable, inverse: Callable) -> Rule:
  """One foreign tensor holding [q; k; v] stacked on axis 0 <-> three of our arrays."""
  def split(a):
    return tuple(transform(p) for p in np.split(a, 3, axis=0))
  return Rule((foreign,), tuple(ours), split,
              lambda *xs: (np.concatenate([inverse(x) for x in xs]),))


def zero_buffer(foreign: str, size: int) -> Rule:
  """A foreign buffer that must be zero (e.g. the AttnProjection's fixed k bias)."""
  def check(a):
    if np.any(a != 0):
      raise CheckpointError("checkpoint", other=[f"{foreign} must be all zeros (a fixed buffer)"])
    return ()
  return Rule((foreign,), (), check, lambda: (np.zeros((size,), np.float32),))


# ---------------------------------------------------------------- applying a rule table
def import_tensors(tensors: Mapping[str, Array], rules: Sequence[Rule],
                   expected: Mapping[str, tuple], what: str,
                   ignore: Callable[[str], bool] = lambda k: False,
                   adapt: Callable[[str, Array, tuple], Array] | None = None,
                   other: Sequence[str] = ()) -> dict[str, Array]:
  """Foreign dict -> our flat dict, checking coverage and shapes against `expected` (path->shape).

  Every foreign key of a rule must be present (with the rule's shapes, where it declares them),
  every other key must be ignored knowingly (`ignore(key)`), and every converted array must have
  the shape `expected` gives; one `CheckpointError` lists all offenders, with `other` problems
  the caller found. `adapt(path, value, expected_shape)` may fix a value before the shape check
  (e.g. resample a position embedding).
  """
  declared = {k: (None if r.shapes is None else r.shapes[j])
              for r in rules for j, k in enumerate(r.foreign)}
  missing, unexpected, misshaped = tree_problems(tensors, declared, ignore=ignore)
  bad = {k for k, s in declared.items()
         if s is not None and k in tensors and tuple(tensors[k].shape) != tuple(s)}
  ours: dict[str, Array] = {}
  other = list(other)
  for r in rules:
    if any(k not in tensors or k in bad for k in r.foreign):
      continue
    try:
      values = r.to_ours(*(np.asarray(tensors[k]) for k in r.foreign))
    except CheckpointError as e:
      other.extend(e.other)
      continue
    except ValueError as e:  # a reshape that cannot work: a shape problem
      other.append(f"{', '.join(r.foreign)} {[tuple(tensors[k].shape) for k in r.foreign]}: {e}")
      continue
    for path, v in zip(r.ours, values, strict=True):
      if adapt is not None and path in expected:
        v = adapt(path, v, tuple(expected[path]))
      if path in ours and not np.array_equal(ours[path], v):
        other.append(f"{r.foreign[0]} differs from another copy of {path} (shared tensors must agree)")
      ours[path] = v
  misshaped += tree_problems(ours, {p: s for p, s in expected.items() if p in ours})[2]
  covered = {p for r in rules for p in r.ours}
  other += [f"{p}: no rule maps it (a bridge bug)" for p in expected if p not in covered]
  err = CheckpointError(what, missing, unexpected, misshaped, other)
  if err.has_problems:
    raise err
  return ours


def export_tensors(ours: Mapping[str, Array], rules: Sequence[Rule]) -> dict[str, Array]:
  out = {}
  for r in rules:
    values = r.to_foreign(*(np.asarray(ours[p]) for p in r.ours))
    out.update({k: np.asarray(v) for k, v in zip(r.foreign, values, strict=True)})
  return out
