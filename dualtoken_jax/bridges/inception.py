"""FID Inception weights: pytorch-fid's state dict -> one `.npz` -> `models.inception.FIDInceptionV3`.

Per `BasicConv2d` module `M` (with `.` in `M` becoming `/`):

    M.conv.weight (O, I, kh, kw)  -> params/M/conv/kernel (kh, kw, I, O)
    M.bn.weight / M.bn.bias       -> params/M/bn/scale / params/M/bn/bias
    M.bn.running_mean / _var      -> batch_stats/M/bn/mean / batch_stats/M/bn/var

`fc.weight`/`fc.bias` (the 1008-way classifier) and `*.num_batches_tracked` are knowingly
dropped; any other key, a missing key or a wrong shape is an error that lists all offenders.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dualtoken_jax.bridges import layout
from dualtoken_jax.bridges import rules as R
from dualtoken_jax.bridges.tensor_files import check_tree, write_npz
from dualtoken_jax.models.inception import FIDInceptionV3, expected_shapes

_BN = (("weight", "params", "scale"), ("bias", "params", "bias"),
       ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))


def rules(expected: Mapping[str, tuple]) -> list[R.Rule]:
  """One rule per pytorch-fid tensor, derived from our variable tree (`expected` paths)."""
  out = []
  for path in expected:
    if not (path.startswith("params/") and path.endswith("/conv/kernel")):
      continue
    module = path[len("params/"):-len("/conv/kernel")]
    torch_name = module.replace("/", ".")
    out.append(R.conv(f"{torch_name}.conv.weight", path))
    for theirs, collection, ours in _BN:
      out.append(R.one(f"{torch_name}.bn.{theirs}", f"{collection}/{module}/bn/{ours}"))
  return out


def _ignored(key: str) -> bool:
  return key in ("fc.weight", "fc.bias") or key.endswith(".num_batches_tracked")


def convert(tensors: Mapping[str, np.ndarray], what: str = "Inception state dict"
            ) -> dict[str, np.ndarray]:
  """pytorch-fid state dict -> our flat float32 variables. Raises `CheckpointError` on mismatch."""
  expected = expected_shapes()
  flat = R.import_tensors(tensors, rules(expected), expected, what, ignore=_ignored)
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def save(path: str | os.PathLike, variables) -> None:
  """Writes `{"params": …, "batch_stats": …}` as a flat float32 `.npz` (the `load` format)."""
  write_npz(path, {k: np.asarray(v, np.float32) for k, v in layout.flatten(variables).items()})


def load(path: str | os.PathLike, model: FIDInceptionV3 | None = None) -> dict[str, Any]:
  """Variables for `FIDInceptionV3.apply` from an `.npz` written by `convert_inception`.

  Strict: raises `CheckpointError` listing every missing, unexpected or misshaped key.
  """
  expected = expected_shapes(model)
  with np.load(path, allow_pickle=False) as f:
    flat = {k: np.asarray(f[k], np.float32) for k in f.files}
  check_tree(flat, expected, f"Inception weights {path}", labels=("file", "model"))
  return jax.tree.map(jnp.asarray, layout.unflatten(flat))
