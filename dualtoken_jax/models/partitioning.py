"""Logical axis names on parameters (MaxText style): models name axes, configs map them to a mesh.

Every transformer parameter is created with `boxed(init, names)`; `jax.eval_shape(model.init)`
then carries the names, and `nn.get_partition_spec` + the config's rules turn them into shardings.
Names used: embed, mlp, heads, kv, norm, vocab, layers (stacked scan axis), act_* (activations).
"""

from __future__ import annotations

import flax.linen as nn
from flax.core import meta

LAYERS_AXIS = "layers"


def boxed(init, names):
  """`init` whose result carries logical axis `names` (None = unnamed axis).

  The names only place parameters (via `sharding.tree_specs`); unboxing never constrains them
  (`rules=()`). Parameters arrive sharded by jit's in_shardings anyway, and Flax's own
  constraint at unbox breaks under active activation rules: DenseGeneral (attention) unboxes
  its kernel at a flattened rank, and the scanned tower's vmapped init at a per-block rank.
  """
  return nn.with_logical_partitioning(init, tuple(names), rules=())


def add_layers_axis(stacked_params):
  """Prepends the "layers" axis name to every boxed leaf of a tree stacked on axis 0."""
  return meta.add_axis(stacked_params, 0, {nn.PARTITION_NAME: LAYERS_AXIS})
