"""Host-local numpy batches -> global `jax.Array`s sharded over the mesh's batch axes.

Each host's pipeline yields its own rows; `jax.make_array_from_process_local_data` stitches
the hosts' rows into one array whose batch dimension is split over the ('data', 'fsdp') mesh
axes (replicated over 'tensor'), the layout the model's `batch -> (data, fsdp)` rule expects.
A host must hold a whole number of rows per batch shard it owns, so the per-host batch size is
checked here with an error that says what would work.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dualtoken_jax.config_files import ConfigError
from dualtoken_jax.parallel.sharding import BATCH_AXES


def batch_sharding(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
  """Leading (batch) dimension split over `axes`, everything else replicated."""
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh axes {mesh.axis_names} lack the batch axes {missing}")
  return NamedSharding(mesh, PartitionSpec(tuple(axes)))


def num_batch_shards(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> tuple[int, int]:
  """(batch shards in the whole mesh, distinct batch shards on this process's devices)."""
  sharding = batch_sharding(mesh, axes)  # Validates the axis names first.
  total = math.prod(mesh.shape[a] for a in axes)
  index_map = sharding.addressable_devices_indices_map((total,))
  local = len({index[0].start for index in index_map.values()})
  return total, local


def host_batch_size(global_batch_size: int, mesh: Mesh,
                    axes: Sequence[str] = BATCH_AXES) -> int:
  """This host's share of `global_batch_size` (what to pass to the input pipeline).

  Raises:
    ConfigError (a ValueError): the global batch does not split evenly over the batch shards.
  """
  total, local = num_batch_shards(mesh, axes)
  if global_batch_size <= 0 or global_batch_size % total:
    nearest = max(1, round(global_batch_size / total)) * total
    raise ConfigError(
        f"batch_size: the global batch size {global_batch_size} must be a positive multiple of the {total} "
        f"batch shards of mesh axes {tuple(axes)} (sizes "
        f"{tuple(mesh.shape[a] for a in axes)}); e.g. {nearest}")
  return global_batch_size // total * local


def make_global_array(local: np.ndarray, mesh: Mesh,
                      axes: Sequence[str] = BATCH_AXES) -> jax.Array:
  """One host's rows of a batch -> the global array, batch dimension over `axes`.

  Raises:
    ValueError: the local batch is not a multiple of this host's batch shards.
  """
  local = np.asarray(local)
  total, local_shards = num_batch_shards(mesh, axes)
  if local.ndim == 0 or local.shape[0] % local_shards:
    raise ValueError(
        f"per-host batch of {local.shape[0] if local.ndim else 'a scalar'} rows does not "
        f"split over the {local_shards} batch shards on this host's devices (mesh axes "
        f"{tuple(axes)} of sizes {tuple(mesh.shape[a] for a in axes)}, {total} shards in all, "
        f"{jax.process_count()} process(es)); use a per-host batch that is a multiple of "
        f"{local_shards}")
  global_shape = (local.shape[0] // local_shards * total,) + local.shape[1:]
  return jax.make_array_from_process_local_data(batch_sharding(mesh, axes), local, global_shape)


def global_array_spec(local: np.ndarray, mesh: Mesh,
                      axes: Sequence[str] = BATCH_AXES) -> jax.ShapeDtypeStruct:
  """The shape, dtype and sharding `make_global_array(local, ...)` would give, without moving
  any data (to lower or cost-analyse a step)."""
  local = np.asarray(local)
  total, local_shards = num_batch_shards(mesh, axes)
  return jax.ShapeDtypeStruct((local.shape[0] // local_shards * total,) + local.shape[1:],
                              local.dtype, sharding=batch_sharding(mesh, axes))


def make_global_batch(batch: Mapping[str, Any], mesh: Mesh,
                      keys: Sequence[str] = ("image", "mask"),
                      axes: Sequence[str] = BATCH_AXES) -> dict[str, jax.Array]:
  """`make_global_array` on the `keys` of a pipeline batch that are present.

  Host-only fields (string `key`s, the `skipped` counters) are left out: log or all-gather
  those separately.
  """
  return {k: make_global_array(batch[k], mesh, axes) for k in keys if k in batch}
