"""Variable trees as flat `"a/b/c" -> leaf` dicts, and the two layouts of a stack of blocks.

Flat keys join the nested keys with "/"; a variables dict ({"params": …, "vq_stats": …}) simply
gets its collection as the first component ("params/img/embedding/kernel"), a bare params tree
does not ("img/embedding/kernel"): `flatten` and `unflatten` serve both.

A stack of blocks is stored per block ("loop": `…/encoderblock_{i}/…`, `layer_{i}/…`) or stacked
on axis 0 under one name ("scan": `…/encoderblock/…`, `layers/…`). `STACKS` names both forms of
every stack in this project: big_vision's `encoderblock` and the Gemma decoder's `layers`.
Bridges speak the loop layout (the per-block naming of the released checkpoints); models may
store either.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import numpy as np

from dualtoken_jax.bridges.tensor_files import CheckpointError

# stacked (scan) name -> per-block (loop) name of block i
STACKS = {"encoderblock": "encoderblock_{}", "layers": "layer_{}"}
_BLOCK = re.compile("^(" + "|".join(re.escape(b.format("")) for b in STACKS.values()) + r")(\d+)$")
_STACKED_OF = {b.format(""): s for s, b in STACKS.items()}


# ---------------------------------------------------------------- nested <-> flat
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested mappings -> {"a/b/c": leaf} (empty mappings vanish)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/c": leaf} -> nested dicts."""
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def shapes(tree: Mapping[str, Any]) -> dict[str, tuple]:
  """Flat path -> shape, for arrays or `jax.ShapeDtypeStruct`s."""
  return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def cast_like(flat: Mapping[str, Any], abstract_flat: Mapping[str, Any]) -> dict[str, Any]:
  """Casts each array to the dtype the model declares (e.g. bf16 checkpoints into f32 params)."""
  return {k: np.asarray(v).astype(abstract_flat[k].dtype) if k in abstract_flat else v
          for k, v in flat.items()}


def to_host(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


def to_device(tree: Any) -> Any:
  return jax.tree.map(jax.numpy.asarray, tree)


# ---------------------------------------------------------------- scan <-> loop
def stack_of(path: str) -> tuple[str, str, str] | None:
  """(prefix, stack name, rest) of a scan-layout path `prefix/name/rest`, or None if the path
  is not in a stack; `prefix` is "" for a stack at the top."""
  parts = path.split("/")
  for i, part in enumerate(parts[:-1]):
    if part in STACKS:
      return "/".join(parts[:i]), part, "/".join(parts[i + 1:])
  return None


def _join(*parts: str) -> str:
  return "/".join(p for p in parts if p)


def block_paths(path: str, shape: tuple[int, ...]) -> list[str]:
  """Per-block paths of a leaf of shape `shape`: `[path]` for an ordinary leaf, one per block
  (`…/encoderblock_{i}/…`, i < shape[0]) for a stacked one."""
  stack = stack_of(path)
  if stack is None:
    return [path]
  prefix, name, rest = stack
  return [_join(prefix, STACKS[name].format(i), rest) for i in range(shape[0])]


def is_scanned(flat: Mapping[str, Any]) -> bool:
  return any(stack_of(k) is not None for k in flat)


def to_loop(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Any layout -> per-block layout: every stacked leaf is split along axis 0."""
  out = {}
  for path, value in flat.items():
    if stack_of(path) is None:
      out[path] = value
    else:
      out.update({p: value[i] for i, p in enumerate(block_paths(path, value.shape))})
  return out


def loop_shapes(flat_shapes: Mapping[str, tuple]) -> dict[str, tuple]:
  """Shapes of any layout restated per block, as `to_loop` would produce them."""
  out = {}
  for path, shape in flat_shapes.items():
    per_block = tuple(shape[1:]) if stack_of(path) else tuple(shape)
    out.update({p: per_block for p in block_paths(path, tuple(shape))})
  return out


def to_scan(flat: Mapping[str, Any], depth: int | None = None,
            stack: Callable = np.stack) -> dict[str, Any]:
  """Per-block layout -> scan layout: `X/encoderblock_{i}/leaf` -> `X/encoderblock/leaf`
  stacked on axis 0 (`stack` may be jnp's, inside jit). Every stack must hold blocks 0..n-1,
  n = `depth` if given, else one more than its highest block index."""
  groups: dict[tuple[str, str, str], dict[int, Any]] = {}
  out = {}
  for path, value in flat.items():
    parts = path.split("/")
    m = next(((i, _BLOCK.match(p)) for i, p in enumerate(parts[:-1]) if _BLOCK.match(p)), None)
    if m is None:
      out[path] = value
      continue
    i, match = m
    key = ("/".join(parts[:i]), _STACKED_OF[match.group(1)], "/".join(parts[i + 1:]))
    groups.setdefault(key, {})[int(match.group(2))] = value
  depths: dict[tuple[str, str], int] = {}
  for (prefix, name, _), blocks in groups.items():
    depths[prefix, name] = max(depths.get((prefix, name), 0), max(blocks) + 1)
  problems = []
  for (prefix, name, rest), blocks in groups.items():
    n = depth if depth is not None else depths[prefix, name]
    if sorted(blocks) != list(range(n)):
      problems.append(f"{_join(prefix, STACKS[name].format('i'), rest)}: blocks {sorted(blocks)} "
                      f"present, expected 0..{n - 1}")
      continue
    out[_join(prefix, name, rest)] = stack([blocks[j] for j in range(n)])
  if problems:
    raise CheckpointError("parameter tree", other=problems)
  return out
