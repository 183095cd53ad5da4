"""Name-and-layout rules between a foreign flat state dict and this project's param trees.

A `Rule` ties one foreign key to zero or more of our paths ("img/embedding/kernel") with a
transform each way. Bridges build rule lists from the model's own abstract tree, so import
and export are the same table read in two directions, and strictness comes for free: every
foreign key must be claimed by a rule and every rule's key must be present, with the shape the
model expects, or `CheckpointError` lists all offenders at once.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from dualtoken_jax.bridges.tensor_files import CheckpointError

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Rule:
  foreign: str                          # key in the foreign state dict
  ours: tuple[str, ...]                 # our flat paths it fills (several for fused weights)
  to_ours: Callable[[Array], tuple]     # foreign array -> arrays for `ours` (a check for buffers)
  to_foreign: Callable[..., Array]      # arrays for `ours` -> foreign array


def one(foreign: str, ours: str, to_ours=lambda a: a, to_foreign=lambda a: a) -> Rule:
  return Rule(foreign, (ours,), lambda a: (to_ours(a),), to_foreign)


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
  return Rule(foreign, tuple(ours), split, lambda *xs: np.concatenate([inverse(x) for x in xs]))


def zero_buffer(foreign: str, size: int) -> Rule:
  """A foreign buffer that must be zero (e.g. the AttnProjection's fixed k bias)."""
  def check(a):
    if np.any(a != 0):
      raise CheckpointError("checkpoint", other=[f"{foreign} must be all zeros (a fixed buffer)"])
    return ()
  return Rule(foreign, (), check, lambda: np.zeros((size,), np.float32))


# ---------------------------------------------------------------- applying a rule table
def import_tensors(tensors: Mapping[str, Array], rules: Sequence[Rule],
                   expected: Mapping[str, tuple], what: str,
                   ignore: Callable[[str], bool] = lambda k: False,
                   adapt: Callable[[str, Array, tuple], Array] | None = None) -> dict[str, Array]:
  """Foreign dict -> our flat dict, checking coverage and shapes against `expected` (path->shape).

  `ignore(key)` marks foreign keys to skip knowingly; `adapt(path, value, expected_shape)` may
  fix a value before the shape check (e.g. resample a position embedding).
  """
  missing = [r.foreign for r in rules if r.foreign not in tensors]
  claimed = {r.foreign for r in rules}
  unexpected = [k for k in tensors if k not in claimed and not ignore(k)]
  ours: dict[str, Array] = {}
  other = []
  for r in rules:
    if r.foreign not in tensors:
      continue
    try:
      values = r.to_ours(np.asarray(tensors[r.foreign]))
    except CheckpointError as e:
      other.extend(e.other)
      continue
    except ValueError as e:  # a reshape that cannot work: a shape problem
      other.append(f"{r.foreign} {tuple(tensors[r.foreign].shape)}: {e}")
      continue
    for path, v in zip(r.ours, values):
      if adapt is not None and path in expected:
        v = adapt(path, v, tuple(expected[path]))
      if path in ours and not np.array_equal(ours[path], v):
        other.append(f"{r.foreign} differs from another copy of {path} (shared tensors must agree)")
      ours[path] = v
  misshaped = [f"{path}: checkpoint {tuple(v.shape)}, model {tuple(expected[path])}"
               for path, v in ours.items() if path in expected and tuple(v.shape) != tuple(expected[path])]
  covered = {p for r in rules for p in r.ours}
  uncovered = [f"{p}: no rule maps it (a bridge bug)" for p in expected if p not in covered]
  err = CheckpointError(what, missing, unexpected, misshaped, other + uncovered)
  if err.has_problems:
    raise err
  return ours


def export_tensors(ours: Mapping[str, Array], rules: Sequence[Rule]) -> dict[str, Array]:
  out = {}
  for r in rules:
    out[r.foreign] = np.asarray(r.to_foreign(*(np.asarray(ours[p]) for p in r.ours)))
  return out


# ---------------------------------------------------------------- scan <-> loop layouts
_BLOCK = re.compile(r"^(.*)/encoderblock_(\d+)/(.*)$")


def loop_to_scan(flat: Mapping[str, Array], depth_of: Callable[[str], int]) -> dict[str, Array]:
  """`X/encoderblock_{i}/leaf` (i < depth) -> `X/encoderblock/leaf` stacked on axis 0."""
  groups: dict[tuple[str, str], dict[int, Array]] = {}
  out = {}
  for path, v in flat.items():
    m = _BLOCK.match(path)
    if m is None:
      out[path] = v
      continue
    groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = v
  for (prefix, leaf), by_layer in groups.items():
    depth = depth_of(prefix)
    if sorted(by_layer) != list(range(depth)):
      raise CheckpointError("checkpoint", other=[f"{prefix}/encoderblock_i/{leaf}: layers "
                                                 f"{sorted(by_layer)} present, expected 0..{depth - 1}"])
    out[f"{prefix}/encoderblock/{leaf}"] = np.stack([by_layer[i] for i in range(depth)])
  return out


def loop_shapes(expected: Mapping[str, tuple]) -> dict[str, tuple]:
  """Shapes of a scan-layout tree restated per block, as `scan_to_loop` would produce them."""
  out = {}
  for path, shape in expected.items():
    prefix, sep, leaf = path.partition("/encoderblock/")
    if not sep:
      out[path] = tuple(shape)
      continue
    for i in range(shape[0]):
      out[f"{prefix}/encoderblock_{i}/{leaf}"] = tuple(shape[1:])
  return out


def block_depths(flat_loop: Mapping[str, object]) -> Callable[[str], int]:
  """prefix -> number of `prefix/encoderblock_{i}` blocks in a loop-layout tree."""
  depths: dict[str, int] = {}
  for path in flat_loop:
    m = _BLOCK.match(path)
    if m:
      depths[m.group(1)] = max(depths.get(m.group(1), 0), int(m.group(2)) + 1)
  return lambda prefix: depths[prefix]


def scan_to_loop(flat: Mapping[str, Array]) -> dict[str, Array]:
  out = {}
  for path, v in flat.items():
    prefix, sep, leaf = path.partition("/encoderblock/")
    if not sep:
      out[path] = v
      continue
    for i in range(v.shape[0]):
      out[f"{prefix}/encoderblock_{i}/{leaf}"] = v[i]
  return out
