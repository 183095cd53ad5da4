"""Converts pytorch-fid's Inception weights to the `.npz` read by `bridges.inception.load`.

    python -m dualtoken_jax.convert_inception \\
        --input pt_inception-2015-12-05-6726825d.pth --output inception_fid.npz

The input is the state dict of pytorch-fid's `fid_inception_v3()` (torchvision `Inception3`
keys: `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, …), as the released
`.pth` (needs torch, CPU build is enough) or as a `.safetensors` of the same dict (no torch).
The key mapping (and what is knowingly dropped) is `bridges.inception`'s; any other key, a
missing key or a wrong shape is an error that lists all offenders. The NVIDIA/clean-fid
TorchScript `inception-2015-12-05.pt` is a different format and is not accepted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from dualtoken_jax.bridges import inception as inception_weights
from dualtoken_jax.bridges import layout
from dualtoken_jax.bridges.tensor_files import read_tensors


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
  flat = inception_weights.convert(read_tensors(src), what=str(src))
  inception_weights.save(args.output, layout.unflatten(flat))
  n = sum(v.size for v in flat.values())
  print(f"wrote {args.output}: {len(flat)} arrays, {n:,} values")
  return 0


if __name__ == "__main__":
  sys.exit(main())
