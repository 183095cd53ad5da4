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
  pending = Pending(tensors, rules, expected, what, ignore, adapt, other, defer=True)
  ours, problems = {}, [pending.problems]
  for path in pending.paths:
    try:
      ours[path] = pending.take(path)
    except CheckpointError as e:
      problems.append(e)
  err = CheckpointError(what, [k for e in problems for k in e.missing],
                        [k for e in problems for k in e.unexpected],
                        [k for e in problems for k in e.misshaped],
                        list(dict.fromkeys(k for e in problems for k in e.other)))
  if err.has_problems:
    raise err
  return ours


class Pending:
  """A rule table checked against a foreign dict, converted one rule at a time as its paths are
  taken: loading a large checkpoint tensor by tensor into device shardings holds one converted
  parameter (and the other outputs of its rule) in host memory, not the whole model.

  The foreign side is checked at once (keys, and shapes where rules declare them: `tensors`
  may be lazy, e.g. `tensor_files.open_safetensors`, so no tensor is read): a `CheckpointError`
  lists every missing, unexpected and misshaped key. What only conversion reveals (a reshape that
  cannot work, copies of a shared tensor that differ, a converted shape other than `expected`)
  raises from `take(path)`, naming it. With `defer`, the first problems are kept in `problems`
  instead of raised, and the paths of rules that can run are still taken (to list everything)."""

  def __init__(self, tensors: Mapping[str, Array], rules: Sequence[Rule],
               expected: Mapping[str, tuple], what: str,
               ignore: Callable[[str], bool] = lambda k: False,
               adapt: Callable[[str, Array, tuple], Array] | None = None,
               other: Sequence[str] = (), *, defer: bool = False):
    declared = {k: (None if r.shapes is None else r.shapes[j])
                for r in rules for j, k in enumerate(r.foreign)}
    missing, unexpected, misshaped = tree_problems(tensors, declared, ignore=ignore)
    bad = {k for k, s in declared.items()
           if s is not None and k in tensors and tuple(tensors[k].shape) != tuple(s)}
    covered = {p for r in rules for p in r.ours}
    other = list(other) + [f"{p}: no rule maps it (a bridge bug)" for p in expected
                           if p not in covered]
    self._tensors, self._expected, self._what, self._adapt = tensors, expected, what, adapt
    # Rules whose inputs are missing or misshaped cannot run; the others convert on `take`.
    self._rules = [r for r in rules if all(k in tensors and k not in bad for k in r.foreign)]
    self._producers: dict[str, list[int]] = {}
    for i, r in enumerate(self._rules):
      for path in r.ours:
        self._producers.setdefault(path, []).append(i)
    self._ready: dict[int, dict[str, Array]] = {}  # rule -> its outputs not yet taken
    for i, r in enumerate(self._rules):  # rules with no outputs (buffers) only check: run now
      if not r.ours:
        try:
          self._run(i)
        except CheckpointError as e:
          other.extend(e.other)
    # What the foreign side alone shows; `defer` leaves raising it to the caller.
    self.problems = CheckpointError(what, missing, unexpected, misshaped, other)
    if self.problems.has_problems and not defer:
      raise self.problems

  @property
  def paths(self) -> list[str]:
    """Our paths, in rule order."""
    return list(self._producers)

  def take(self, path: str) -> Array:
    """The converted array of `path` (each path once)."""
    first, *copies = self._producers.pop(path)
    value = self._output(first, path)
    for i in copies:
      if not np.array_equal(value, self._output(i, path)):
        raise CheckpointError(self._what, other=[
            f"{self._rules[i].foreign[0]} differs from another copy of {path} (shared tensors "
            "must agree)"])
    if path in self._expected and tuple(value.shape) != tuple(self._expected[path]):
      raise CheckpointError(self._what, misshaped=tree_problems(
          {path: value}, {path: self._expected[path]})[2])
    return value

  def _output(self, i: int, path: str) -> Array:
    if i not in self._ready:
      self._run(i)
    outputs = self._ready[i]
    value = outputs.pop(path)
    if not outputs:
      del self._ready[i]
    return value

  def _run(self, i: int) -> None:
    r = self._rules[i]
    try:
      values = r.to_ours(*(np.asarray(self._tensors[k]) for k in r.foreign))
    except CheckpointError as e:
      raise CheckpointError(self._what, other=e.other) from e
    except ValueError as e:  # a reshape that cannot work: a shape problem
      shapes = [tuple(self._tensors[k].shape) for k in r.foreign]
      raise CheckpointError(self._what, other=[f"{', '.join(r.foreign)} {shapes}: {e}"]) from e
    outputs = {}
    for path, v in zip(r.ours, values, strict=True):
      if self._adapt is not None and path in self._expected:
        v = self._adapt(path, v, tuple(self._expected[path]))
      outputs[path] = v
    if outputs:
      self._ready[i] = outputs


def export_tensors(ours: Mapping[str, Array], rules: Sequence[Rule]) -> dict[str, Array]:
  out = {}
  for r in rules:
    values = r.to_foreign(*(np.asarray(ours[p]) for p in r.ours))
    out.update({k: np.asarray(v) for k, v in zip(r.foreign, values, strict=True)})
  return out
