"""Converts pytorch-fid's Inception weights to the `.npz` read by `models.inception.load`.

    python -m dualtoken_jax.convert_inception \\
        --input pt_inception-2015-12-05-6726825d.pth --output inception_fid.npz

The input is the state dict of pytorch-fid's `fid_inception_v3()` (torchvision `Inception3`
keys: `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, …), as the released
`.pth` (needs torch, CPU build is enough) or as a `.safetensors` of the same dict (no torch).
Per `BasicConv2d` module `M`:

    M.conv.weight (O, I, kh, kw)  -> params/M/conv/kernel (kh, kw, I, O)
    M.bn.weight / M.bn.bias       -> params/M/bn/scale / params/M/bn/bias
    M.bn.running_mean / _var      -> batch_stats/M/bn/mean / batch_stats/M/bn/var

with `.` in `M` becoming `/`. `fc.weight`/`fc.bias` (the 1008-way classifier) and
`*.num_batches_tracked` are knowingly dropped; any other key, a missing key or a wrong shape is
an error that lists all offenders. The NVIDIA/clean-fid TorchScript `inception-2015-12-05.pt`
is a different format and is not accepted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dualtoken_jax.bridges import rules as R
from dualtoken_jax.bridges.tensor_files import read_tensors
from dualtoken_jax.models import inception

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
  expected = inception.expected_shapes()
  flat = R.import_tensors(tensors, rules(expected), expected, what, ignore=_ignored)
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def export(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our flat variables -> the pytorch-fid state dict (without `fc`), the inverse of `convert`."""
  return R.export_tensors(flat, rules(inception.expected_shapes()))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dualtoken_jax.convert_inception",
      description="Convert pytorch-fid's FID Inception weights (pt_inception-2015-12-05-*.pth "
                  "or a .safetensors of the same state dict) to a Flax .npz.")
  parser.add_argument("--input", required=True, help=".pth (needs torch) or .safetensors")
  parser.add_argument("--output", required=True, help="the .npz to write")
  args = parser.parse_args(argv)
  src = Path(args.input)
  if src.suffix.lower() not in (".pth", ".pt", ".safetensors"):
    parser.error(f"--input must be a .pth/.pt (PyTorch) or .safetensors file, got {src.name}")
  flat = convert(read_tensors(src), what=str(src))
  inception.save(args.output, inception.unflatten(flat))
  n = sum(v.size for v in flat.values())
  print(f"wrote {args.output}: {len(flat)} arrays, {n:,} values")
  return 0


if __name__ == "__main__":
  sys.exit(main())
