"""Converts torchvision's VGG16 and the LPIPS v0.1 heads into the `.npz` that `load_lpips` reads.

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
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dualtoken_jax.bridges.tensor_files import CheckpointError, read_tensors
from dualtoken_jax.models.lpips import TAP_CHANNELS, vgg16_conv_channels

_IGNORED_PREFIX = "classifier."  # VGG16's fully connected head


def _torch_conv_to_flax(w: np.ndarray) -> np.ndarray:
  """(out, in, kh, kw) -> (kh, kw, in, out)."""
  return np.transpose(w, (2, 3, 1, 0))


def _check(what: str, tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
           ignored_prefix: str | None = None) -> None:
  present = {k for k in tensors if not (ignored_prefix and k.startswith(ignored_prefix))}
  err = CheckpointError(
      what, missing=set(expected) - present, unexpected=present - set(expected),
      misshaped=[f"{k}: {tuple(tensors[k].shape)}, expected {s}" for k, s in expected.items()
                 if k in tensors and tuple(tensors[k].shape) != s])
  if err.has_problems:
    raise err


def convert(vgg: Mapping[str, np.ndarray], lin: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torchvision VGG16 + LPIPS-head state dicts -> flat `params` paths of `models.lpips.LPIPS`."""
  convs = vgg16_conv_channels()
  expected_vgg = {}
  for idx, (c_in, c_out) in convs.items():
    expected_vgg[f"features.{idx}.weight"] = (c_out, c_in, 3, 3)
    expected_vgg[f"features.{idx}.bias"] = (c_out,)
  _check("torchvision VGG16 state dict", vgg, expected_vgg, ignored_prefix=_IGNORED_PREFIX)
  expected_lin = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(TAP_CHANNELS)}
  _check("LPIPS linear heads (vgg.pth)", lin, expected_lin)

  out = {}
  for idx in convs:
    out[f"vgg/conv{idx}/kernel"] = _torch_conv_to_flax(np.asarray(vgg[f"features.{idx}.weight"], np.float32))
    out[f"vgg/conv{idx}/bias"] = np.asarray(vgg[f"features.{idx}.bias"], np.float32)
  for k in range(len(TAP_CHANNELS)):
    out[f"lin{k}/kernel"] = _torch_conv_to_flax(np.asarray(lin[f"lin{k}.model.1.weight"], np.float32))
  return out


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:  # a file object, so numpy does not append another ".npz"
    np.savez(f, **arrays)
  os.replace(tmp, path)  # never leave a half-written file under the final name


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
  arrays = convert(vgg, read_tensors(args.lin))
  write_npz(args.output, arrays)
  ignored = sum(k.startswith(_IGNORED_PREFIX) for k in vgg)
  n_params = sum(a.size for a in arrays.values())
  print(f"wrote {args.output}: {len(arrays)} arrays, {n_params:,} parameters "
        f"({ignored} VGG16 classifier tensors dropped)")


if __name__ == "__main__":
  main()
