"""Flat views of variable trees: {"params/img/embedding/kernel": array, "vq_stats/...": ...}.

Bridges work on flat, per-block ("loop") layouts; models may store blocks stacked ("scan").
These helpers convert between the nested variables a model applies and that flat form.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from dualtoken_jax.bridges import rules as R


def flatten(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Nested {collection: tree} -> {"collection/a/b": leaf}."""
  return {f"{c}/{k}": v for c, tree in variables.items()
          for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  per_collection: dict[str, dict] = {}
  for key, v in flat.items():
    c, _, path = key.partition("/")
    per_collection.setdefault(c, {})[path] = v
  return {c: traverse_util.unflatten_dict(t, sep="/") for c, t in per_collection.items()}


def shapes(variables: Mapping[str, Any]) -> dict[str, tuple]:
  """Flat path -> shape, for arrays or `jax.ShapeDtypeStruct`s."""
  return {k: tuple(v.shape) for k, v in flatten(variables).items()}


def to_loop(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Any layout -> per-block layout (stacked `encoderblock` split into `encoderblock_{i}`)."""
  return R.scan_to_loop({k: np.asarray(v) for k, v in flat.items()})


def to_model_layout(flat_loop: Mapping[str, Any], scan: bool) -> dict[str, Any]:
  return R.loop_to_scan(flat_loop, R.block_depths(flat_loop)) if scan else dict(flat_loop)


def cast_like(flat: Mapping[str, Any], abstract_flat: Mapping[str, Any]) -> dict[str, Any]:
  """Casts each array to the dtype the model declares (e.g. bf16 checkpoints into f32 params)."""
  return {k: np.asarray(v).astype(abstract_flat[k].dtype) if k in abstract_flat else v
          for k, v in flat.items()}


def to_device(variables: Mapping[str, Any]) -> dict[str, Any]:
  return jax.tree.map(jax.numpy.asarray, variables)


def to_host(variables: Mapping[str, Any]) -> dict[str, Any]:
  return jax.tree.map(np.asarray, variables)
