"""From the decoder's logical axis names to `NamedSharding`s on a ('data', 'fsdp', 'tensor') mesh.

Rules are data (MaxText style): a logical name maps to mesh axes. A mesh axis is dropped for a
dimension it does not divide (e.g. one KV head on a 2-way tensor axis), so every config can be
placed on every mesh; such dimensions are replicated instead.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dualtoken_jax.bridges import layout
from dualtoken_jax.llm import config as C
from dualtoken_jax.llm import gemma
from dualtoken_jax.parallel import sharding as shared

# The mesh and the logical-name rules are shared with the tokenizer: see dualtoken_jax/sharding.py.
MESH_AXES, DEFAULT_RULES = shared.MESH_AXES, shared.DEFAULT_RULES
single_device_mesh, spec_for = shared.single_device_mesh, shared.spec_for


def logical_params(config) -> dict[str, nn.Partitioned]:
  """Flat path -> boxed `ShapeDtypeStruct` (shape, dtype and logical names) of every param,
  in the config's layout (`scan_layers`)."""
  return dict(_logical_params(gemma.frozen(config)))


@functools.lru_cache(maxsize=32)
def _logical_params(config) -> dict[str, nn.Partitioned]:
  model = gemma.GemmaDecoder(config)
  tokens = np.zeros((1, 1), np.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
  return layout.flatten(abstract)


def param_shapes(config, scan_layers: bool | None = None) -> dict[str, tuple[int, ...]]:
  """Flat path -> shape, in the loop (scan_layers=False) or scan layout."""
  if scan_layers is not None and scan_layers != config.scan_layers:
    config = C.replace(config, scan_layers=scan_layers)
  return {k: tuple(v.value.shape) for k, v in logical_params(config).items()}


def param_names(config, scan_layers: bool | None = None) -> dict[str, tuple]:
  """Flat path -> logical axis names, in the loop or scan layout."""
  if scan_layers is not None and scan_layers != config.scan_layers:
    config = C.replace(config, scan_layers=scan_layers)
  return {k: tuple(v.names) for k, v in logical_params(config).items()}


def abstract_params(config, mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> dict[str, Any]:
  """Nested tree of `jax.ShapeDtypeStruct(shape, param_dtype, sharding=NamedSharding)`: the
  restore target of a checkpoint, placed on `mesh` (default: the first device)."""
  mesh = mesh or single_device_mesh()
  flat = {}
  for path, boxed in logical_params(config).items():
    shape = boxed.value.shape
    sharding = NamedSharding(mesh, spec_for(boxed.names, shape, mesh, rules))
    flat[path] = jax.ShapeDtypeStruct(shape, np.dtype(config.param_dtype), sharding=sharding)
  return layout.unflatten(flat)


def shardings_of(abstract) -> Any:
  return jax.tree.map(lambda a: a.sharding, abstract)


def init_params(config, seed: int = 0, mesh: Mesh | None = None,
                rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
  """Randomly initialised params, created directly in their shardings."""
  model = gemma.GemmaDecoder(gemma.frozen(config))
  target = shardings_of(abstract_params(config, mesh, rules))
  tokens = np.zeros((1, 1), np.int32)
  init = lambda: nn.unbox(model.init(jax.random.key(seed), tokens)["params"])
  return jax.jit(init, out_shardings=target)()


def place(params: Mapping[str, Any], config, mesh: Mesh | None = None,
          rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
  """Host arrays (nested tree in the config's layout) -> device arrays in their shardings,
  cast to `param_dtype`."""
  abstract = abstract_params(config, mesh, rules)
  return jax.tree.map(
      lambda a, t: jax.device_put(np.asarray(a).astype(t.dtype), t.sharding), params, abstract)
