"""LPIPS weights: torchvision's VGG16 and the LPIPS v0.1 heads -> one `.npz` -> `models.lpips.LPIPS`.

`convert` maps the PyTorch state dicts to our flat params (torchvision's feature index is kept in
the name: `features.{idx}` -> `vgg/conv{idx}`, `lin{k}.model.1` -> `lin{k}`), `write_npz` stores
them, and `load` reads the `.npz` back as the `params` tree. Every step is strict: anything
missing, unexpected or misshaped fails with the full list.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from dualtoken_jax.bridges import layout
from dualtoken_jax.bridges.tensor_files import check_tree, read_tensors
from dualtoken_jax.models.lpips import TAP_CHANNELS, param_shapes, vgg16_conv_channels

IGNORED_PREFIX = "classifier."  # VGG16's fully connected head: read and deliberately dropped
_LABELS = ("", "expected")


def _torch_conv_to_flax(w: np.ndarray) -> np.ndarray:
  """(out, in, kh, kw) -> (kh, kw, in, out)."""
  return np.transpose(w, (2, 3, 1, 0))


def convert(vgg: Mapping[str, np.ndarray], lin: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torchvision VGG16 + LPIPS-head state dicts -> flat `params` paths of `models.lpips.LPIPS`."""
  convs = vgg16_conv_channels()
  expected_vgg = {}
  for idx, (c_in, c_out) in convs.items():
    expected_vgg[f"features.{idx}.weight"] = (c_out, c_in, 3, 3)
    expected_vgg[f"features.{idx}.bias"] = (c_out,)
  check_tree(vgg, expected_vgg, "torchvision VGG16 state dict",
             ignore=lambda k: k.startswith(IGNORED_PREFIX), labels=_LABELS)
  expected_lin = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(TAP_CHANNELS)}
  check_tree(lin, expected_lin, "LPIPS linear heads (vgg.pth)", labels=_LABELS)

  out = {}
  for idx in convs:
    out[f"vgg/conv{idx}/kernel"] = _torch_conv_to_flax(np.asarray(vgg[f"features.{idx}.weight"], np.float32))
    out[f"vgg/conv{idx}/bias"] = np.asarray(vgg[f"features.{idx}.bias"], np.float32)
  for k in range(len(TAP_CHANNELS)):
    out[f"lin{k}/kernel"] = _torch_conv_to_flax(np.asarray(lin[f"lin{k}.model.1.weight"], np.float32))
  return out


def load(path: str | os.PathLike | None) -> dict:
  """The LPIPS `params` tree (numpy float32) from an `.npz` written by `convert_lpips`.

  Keys must match the model exactly; any missing, extra or misshaped array is reported at once.
  """
  if not path:
    raise ValueError(
        "no LPIPS weights configured: LPIPS needs ImageNet VGG16 + LPIPS v0.1 heads, which are never "
        "downloaded. Convert them once with `python -m dualtoken_jax.convert_lpips --vgg "
        "vgg16-397923af.pth --lin vgg.pth --output lpips_vgg.npz` (torchvision's VGG16 weights and "
        "the `lpips` package's weights/v0.1/vgg.pth) and pass the .npz path.")
  tensors = read_tensors(path)
  expected = param_shapes()
  check_tree(tensors, expected, f"LPIPS weights {path}", labels=_LABELS)
  return layout.unflatten({k: np.asarray(tensors[k], np.float32) for k in expected})
