"""The decoder's two parameter layouts as flat `path -> array` dicts, and moves between them.

Loop layout: `layer_{i}/attn/q_einsum/w`, ...; scan layout: `layers/attn/q_einsum/w` with the
layers stacked on axis 0. Checkpoint bridges speak the loop layout (it is the per-layer naming
of the official checkpoints); models may use either.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import flax
import numpy as np

from dualtoken_jax.bridges.tensor_files import CheckpointError

_LAYER = re.compile(r"^layer_(\d+)/(.*)$")
STACKED_PREFIX = "layers/"


def flatten(params: Mapping[str, Any]) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(dict(params), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def is_scanned(flat: Mapping[str, Any]) -> bool:
  return any(k.startswith(STACKED_PREFIX) for k in flat)


def to_scan(flat_loop: Mapping[str, Any], depth: int, stack: Callable = np.stack) -> dict[str, Any]:
  """`layer_{i}/leaf` for i < depth -> `layers/leaf` stacked on axis 0 (`stack` may be jnp's)."""
  groups: dict[str, dict[int, Any]] = {}
  out = {}
  for path, value in flat_loop.items():
    m = _LAYER.match(path)
    if m is None:
      out[path] = value
    else:
      groups.setdefault(m.group(2), {})[int(m.group(1))] = value
  problems = [f"layer_i/{leaf}: layers {sorted(by_layer)} present, expected 0..{depth - 1}"
              for leaf, by_layer in groups.items() if sorted(by_layer) != list(range(depth))]
  if problems:
    raise CheckpointError("parameter tree", other=problems)
  for leaf, by_layer in groups.items():
    out[STACKED_PREFIX + leaf] = stack([by_layer[i] for i in range(depth)])
  return out


def to_loop(flat_scan: Mapping[str, Any]) -> dict[str, Any]:
  """`layers/leaf` stacked on axis 0 -> `layer_{i}/leaf`."""
  out = {}
  for path, value in flat_scan.items():
    if not path.startswith(STACKED_PREFIX):
      out[path] = value
      continue
    leaf = path[len(STACKED_PREFIX):]
    for i in range(value.shape[0]):
      out[f"layer_{i}/{leaf}"] = value[i]
  return out
