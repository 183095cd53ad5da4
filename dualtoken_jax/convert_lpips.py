"""Converts torchvision's VGG16 and the LPIPS v0.1 heads into the `.npz` that `bridges.lpips.load` reads.

  python -m dualtoken_jax.convert_lpips --vgg vgg16-397923af.pth --lin vgg.pth --output lpips_vgg.npz

--vgg: torchvision's ImageNet `vgg16()` state dict (`features.{idx}.weight/bias`; the
`classifier.*` keys are read and deliberately dropped, LPIPS never uses them).
--lin: the LPIPS heads, `lin{k}.model.1.weight` of shape (1, C, 1, 1) (richzhang's
`lpips/weights/v0.1/vgg.pth`, md5 d507d7349b931f0638a25a48a722f98a, which taming downloads too).
Either file may be `.pth` (needs torch, imported only then) or `.safetensors` of the same state dict.
Keys are checked strictly: anything missing, unexpected or misshaped fails with the full list.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from dualtoken_jax.bridges import lpips as lpips_weights
from dualtoken_jax.bridges.tensor_files import read_tensors, write_npz


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m dualtoken_jax.convert_lpips", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vgg", required=True, help="torchvision vgg16 state dict (.pth or .safetensors)")
  parser.add_argument("--lin", required=True, help="LPIPS v0.1 vgg heads (.pth or .safetensors)")
  parser.add_argument("--output", required=True, help="the .npz to write")
  args = parser.parse_args(argv)
  if not args.output.endswith(".npz"):
    parser.error(f"--output must end in .npz, got {args.output!r}")

  vgg = read_tensors(args.vgg)
  arrays = lpips_weights.convert(vgg, read_tensors(args.lin))
  write_npz(args.output, arrays)
  ignored = sum(k.startswith(lpips_weights.IGNORED_PREFIX) for k in vgg)
  n_params = sum(a.size for a in arrays.values())
  print(f"wrote {args.output}: {len(arrays)} arrays, {n_params:,} parameters "
        f"({ignored} VGG16 classifier tensors dropped)")


if __name__ == "__main__":
  main()
