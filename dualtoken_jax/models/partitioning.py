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
  """`init` whose result carries logical axis `names` (None = unnamed axis)."""
  return nn.with_logical_partitioning(init, tuple(names))


def add_layers_axis(stacked_params):
  """Prepends the "layers" axis name to every boxed leaf of a tree stacked on axis 0."""
  return meta.add_axis(stacked_params, 0, {nn.PARTITION_NAME: LAYERS_AXIS})
