"""Meshes and parameter shardings over the ('data', 'fsdp', 'tensor') mesh.

Two mechanisms, both data (MaxText / big_vision style):
* logical axis rules: a parameter created with logical axis names (see `models/partitioning`)
  gets, per dimension, the mesh axes its name maps to — dropped where they do not divide the
  dimension, so every config can be placed on every mesh;
* a size fallback for parameters without names (convolutions, codebooks, the discriminator):
  FSDP over the largest dimension the fsdp axis divides, when the array is large enough to be
  worth it, else replicated.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes. Weights: FSDP on the model width, tensor parallelism on heads,
# MLP and vocabulary. Activations: batch over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_emb", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("norm", None),
    ("layers", None),
)
MIN_FSDP_BYTES = 4 * 2**20  # big_vision's fsdp(min_size_to_shard_mb=4)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axis sizes {data, fsdp, tensor}; one -1 takes the
  rest. Axes are `Auto` (Linen's logical partitioning needs that under jax >= 0.7)."""
  devices = list(devices or jax.devices())
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot form mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except (ValueError, NotImplementedError, AssertionError):  # e.g. simulated CPU devices
    grid = np.array(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def single_device_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose axes carry logical `names`."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape, strict=True):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = []
    for axis in axes:  # keep mesh axes while they still divide the dimension
      size = int(np.prod([mesh.shape[a] for a in kept + [axis]]))
      if axis in mesh.shape and axis not in used and dim % size == 0:
        kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def fallback_spec(shape: Sequence[int], itemsize: int, mesh: Mesh,
                  min_bytes: int = MIN_FSDP_BYTES) -> PartitionSpec:
  """FSDP over the largest dimension the fsdp axis divides, if the array has >= min_bytes."""
  n = mesh.shape.get("fsdp", 1)
  if n == 1 or int(np.prod(shape, dtype=np.int64)) * itemsize < min_bytes:
    return PartitionSpec()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      return PartitionSpec(*[("fsdp" if d == dim else None) for d in range(len(shape))])
  return PartitionSpec()


def tree_specs(abstract: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
               min_bytes: int = MIN_FSDP_BYTES) -> Any:
  """PartitionSpecs for a tree of (possibly logically boxed) arrays or ShapeDtypeStructs."""
  def spec(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned | nn.Partitioned):
      value = leaf.value
      return spec_for(leaf.names, value.shape, mesh, rules)
    return fallback_spec(leaf.shape, np.dtype(leaf.dtype).itemsize, mesh, min_bytes)
  return jax.tree.map(spec, abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def named(specs: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))
