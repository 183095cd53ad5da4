"""Reading and writing flat name -> array files: safetensors, PyTorch pickles, big_vision npz;
and the one strict check of a flat tree against the shapes a model expects (`check_tree`).

Everything comes back as numpy arrays keyed by the file's own names; layout quirks (prefixes,
transposes, stacking) belong to the bridge that knows the model, not here.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file as _load_safetensors
from safetensors.numpy import save_file as _save_safetensors


class CheckpointError(ValueError):
  """A checkpoint that does not match the model: lists every missing, extra or misshaped key."""

  def __init__(self, what: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
               misshaped: Iterable[str] = (), other: Iterable[str] = ()):
    self.missing, self.unexpected = sorted(missing), sorted(unexpected)
    self.misshaped, self.other = sorted(misshaped), list(other)
    lines = [f"{what} does not match the model:"]
    for title, items in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                         ("keys with the wrong shape", self.misshaped), ("other problems", self.other)):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines.extend(f"    {k}" for k in items[:50])
        if len(items) > 50:
          lines.append(f"    ... and {len(items) - 50} more")
    super().__init__("\n".join(lines))

  @property
  def has_problems(self) -> bool:
    return bool(self.missing or self.unexpected or self.misshaped or self.other)


def _shape(value) -> tuple:
  return tuple(getattr(value, "shape", value))


def tree_problems(found: Mapping[str, Any], expected: Mapping[str, tuple | None], *,
                  ignore: Callable[[str], bool] = lambda k: False,
                  labels: tuple[str, str] = ("checkpoint", "model")
                  ) -> tuple[list[str], list[str], list[str]]:
  """(missing, unexpected, misshaped) of flat `found` (path -> array or shape) against
  `expected` (path -> shape, or None where any shape will do).

  `ignore(key)` marks found keys that are skipped knowingly (never unexpected); `labels` name the
  two sides in the misshaped lines ("path: checkpoint (a, b), model (c, d)"; "" for none).
  """
  def side(label, shape):
    return f"{label} {shape}" if label else str(shape)
  missing = [k for k in expected if k not in found]
  unexpected = [k for k in found if k not in expected and not ignore(k)]
  misshaped = [f"{k}: {side(labels[0], _shape(found[k]))}, {side(labels[1], tuple(s))}"
               for k, s in expected.items()
               if k in found and s is not None and _shape(found[k]) != tuple(s)]
  return missing, unexpected, misshaped


def check_tree(found: Mapping[str, Any], expected: Mapping[str, tuple | None], what: str, *,
               ignore: Callable[[str], bool] = lambda k: False, other: Iterable[str] = (),
               labels: tuple[str, str] = ("checkpoint", "model")) -> None:
  """Raises one `CheckpointError` listing every key of `found` that is missing, unexpected or
  misshaped against `expected` (see `tree_problems`), plus the `other` problems given."""
  err = CheckpointError(what, *tree_problems(found, expected, ignore=ignore, labels=labels),
                        other=other)
  if err.has_problems:
    raise err


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a `.safetensors`, `.pt`/`.pth`/`.bin` (PyTorch) or `.npz` file into numpy arrays."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    return dict(_load_safetensors(str(path)))
  if suffix in (".pt", ".pth", ".bin", ".ckpt"):
    return read_torch(path)
  if suffix == ".npz":
    return read_npz(path)
  raise ValueError(f"unsupported checkpoint format {suffix!r} for {path}: expected .safetensors, "
                   ".pt/.pth/.bin (PyTorch) or .npz (big_vision)")


def read_torch(path: Path) -> dict[str, np.ndarray]:
  """A PyTorch checkpoint, loaded with `weights_only=True` (no arbitrary code runs). Accepts a
  bare state dict or one wrapped as {"state_dict": ...} / {"model": ...}."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading the PyTorch pickle {path} needs torch: `pip install torch` (CPU "
                      "build is enough), or convert it to .safetensors on a machine that has torch"
                      ) from e
  if not zipfile.is_zipfile(path) and path.stat().st_size == 0:
    raise ValueError(f"{path} is empty")
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping):
    for wrapper in ("state_dict", "model", "module"):
      if wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      continue
    v = v.detach().cpu()
    out[k] = (v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16
              else v.numpy())
  return out


def read_npz(path: Path) -> dict[str, np.ndarray]:
  """A big_vision `.npz`: `/`-joined keys; bf16 arrays saved as 2-byte void are viewed back."""
  with np.load(path, allow_pickle=False) as f:
    return {k: _recover_dtype(f[k]) for k in f.files}


def _recover_dtype(a: np.ndarray) -> np.ndarray:
  if a.dtype.kind == "V" and a.dtype.itemsize == 2:
    return a.view(ml_dtypes.bfloat16)
  return a


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  _save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                    metadata=dict(metadata or {}))
  os.replace(tmp, path)  # never leave a half-written checkpoint under the final name


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """An uncompressed `.npz` of `arrays`, written atomically (as `read_npz` reads it back)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:  # a file object, so numpy does not append another ".npz"
    np.savez(f, **arrays)
  os.replace(tmp, path)
