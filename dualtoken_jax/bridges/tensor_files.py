"""Reading and writing flat name -> array files: safetensors, PyTorch pickles, big_vision npz;
the one strict check of a flat tree against the shapes a model expects (`check_tree`); the one
check that loaded weights are finite (`check_finite`); sha256 manifests of saved directories
(`write_checksums` / `verify_checksums`).

Everything comes back as numpy arrays keyed by the file's own names; layout quirks (prefixes,
transposes, stacking) belong to the bridge that knows the model, not here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file as _load_safetensors
from safetensors.numpy import save_file as _save_safetensors


class CheckpointError(ValueError):
  """A checkpoint that does not match the model: lists every missing, extra or misshaped key."""

  def __init__(self, what: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
               misshaped: Iterable[str] = (), other: Iterable[str] = (),
               headline: str | None = "does not match the model"):
    self.missing, self.unexpected = sorted(missing), sorted(unexpected)
    self.misshaped, self.other = sorted(misshaped), list(other)
    lines = [f"{what} {headline}:" if headline else what]  # None: `what` is the whole message
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
  """Loads a `.safetensors`, `.pt`/`.pth`/`.bin` (PyTorch) or `.npz` file into numpy arrays. A
  truncated or corrupted safetensors / npz file raises `CheckpointError` naming it."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  suffix = path.suffix.lower()
  if suffix in (".safetensors", ".npz"):
    try:
      return dict(_load_safetensors(str(path))) if suffix == ".safetensors" else read_npz(path)
    except Exception as e:  # safetensors' SafetensorError, zipfile.BadZipFile, EOFError, ...
      raise _unreadable(path, e) from e
  if suffix in (".pt", ".pth", ".bin", ".ckpt"):
    return read_torch(path)
  raise ValueError(f"unsupported checkpoint format {suffix!r} for {path}: expected .safetensors, "
                   ".pt/.pth/.bin (PyTorch) or .npz (big_vision)")


def _unreadable(path: Path, e: Exception) -> CheckpointError:
  return CheckpointError(f"{path} is not a readable {path.suffix.lower()} file (truncated or "
                         f"corrupted? {path.stat().st_size} bytes): {type(e).__name__}: {e}",
                         headline=None)


class LazyTensor:
  """One safetensors tensor, read when converted (`np.asarray`); its shape from the header."""

  def __init__(self, file: Path, key: str, shape):
    self.file, self.key, self.shape = file, key, tuple(shape)

  def __array__(self, dtype=None, copy=None):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    try:
      with safe_open(str(self.file), "numpy") as f:
        a = f.get_tensor(self.key)
    except Exception as e:  # a file changed or truncated since it was opened
      raise _unreadable(self.file, e) from e
    return a if dtype is None else a.astype(dtype)


def open_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
  """The tensors of a `.safetensors` file as `LazyTensor`s (shapes from the header, data read
  on conversion), so a large checkpoint is never held twice in host memory. A truncated or
  corrupted header raises `CheckpointError` naming the file."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  path = Path(path)
  try:
    with safe_open(str(path), "numpy") as f:
      return {k: LazyTensor(path, k, f.get_slice(k).get_shape()) for k in f.keys()}
  except Exception as e:  # safetensors' SafetensorError, OSError, ...
    raise _unreadable(path, e) from e


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


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
  """The one way files are written atomically: yields a temporary name beside `path` (in the
  same directory, so the rename cannot cross file systems), renamed onto `path` when the block
  ends and removed if it raises. A kill leaves at most a `*.tmp` file, never a half-written file
  under the final name."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  try:
    yield tmp
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  os.replace(tmp, path)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  with atomic_target(path) as tmp:
    _save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                      metadata=dict(metadata or {}))


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """An uncompressed `.npz` of `arrays`, written atomically (as `read_npz` reads it back)."""
  with atomic_target(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)  # a file object, so numpy does not append another ".npz"


def read_tagged_npz(path: str | os.PathLike, tag: str, what: str, hint: str = "") -> dict[str, np.ndarray]:
  """The arrays of an `.npz` written with `write_npz({"format": tag, ...})`, after checking its
  `format` entry names `tag` (so a file of another kind fails with an error saying so)."""
  with np.load(path, allow_pickle=False) as f:
    if "format" not in f.files or str(f["format"]) != tag:
      raise ValueError(f"{path} is not {what} (expected the key 'format' = {tag!r}{hint})")
    return {k: f[k] for k in f.files if k != "format"}


# ---------------------------------------------------------------- finite weights
_FINITE_CHUNK_BYTES = 2 << 30


@jax.jit
def _finite_per_leaf(leaves: list) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_paths(tree: Any) -> list[str]:
  """Paths ("a/b/c") of the float leaves of `tree` that hold NaN or Inf.

  On device: one jitted reduction returning one bool per leaf (compiled once per tree
  structure), over chunks of at most 2 GiB of host (numpy) leaves so that checking a large
  host tree never needs a device that holds all of it; device arrays are checked where they are.
  """
  flat = [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  bad, chunk, size = [], [], 0
  for i, (path, x) in enumerate(flat):
    chunk.append((path, x))
    size += x.size * x.dtype.itemsize if isinstance(x, np.ndarray) else 0
    if size >= _FINITE_CHUNK_BYTES or i == len(flat) - 1:
      ok = np.asarray(_finite_per_leaf([a for _, a in chunk]))
      bad.extend(p for (p, _), good in zip(chunk, ok) if not good)
      chunk, size = [], 0
  return bad


def all_finite(tree: Any) -> bool:
  """Whether every float leaf of `tree` is free of NaN/Inf (see `nonfinite_paths`)."""
  return not nonfinite_paths(tree)


def check_finite(tree: Any, what: str) -> None:
  """Raises `CheckpointError` naming `what` (the file or directory) and the first leaves that
  hold NaN/Inf: a corrupted checkpoint fails at load, not as NaN outputs later."""
  bad = nonfinite_paths(tree)
  if bad:
    more = [f"... and {len(bad) - 10} more"] if len(bad) > 10 else []
    raise CheckpointError(what, other=[f"{k}: NaN/Inf values" for k in bad[:10]] + more,
                          headline="holds non-finite weights (corrupted?)")


# ---------------------------------------------------------------- checksum manifests
CHECKSUMS = "checksums.json"


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def write_checksums(root: str | os.PathLike, under: str = "") -> Path:
  """Writes `root/checksums.json`: the sha256 of every file under `root/under` (paths relative
  to `root`), after the files themselves (atomically), so a manifest describes complete files."""
  root = Path(root)
  names = sorted(str(p.relative_to(root)) for p in (root / under).rglob("*")
                 if p.is_file() and p.name != CHECKSUMS)
  with atomic_target(root / CHECKSUMS) as tmp:
    tmp.write_text(json.dumps({"sha256": {n: _sha256(root / n) for n in names}}, indent=1))
  return root / CHECKSUMS


def verify_checksums(root: str | os.PathLike) -> bool:
  """Checks the files under `root` against its `checksums.json`; False when there is none.
  Raises `CheckpointError` naming every listed file that is missing or whose bytes changed."""
  root = Path(root)
  if not (root / CHECKSUMS).is_file():
    return False
  expected = json.loads((root / CHECKSUMS).read_text())["sha256"]
  problems = []
  for name, digest in expected.items():
    if not (root / name).is_file():
      problems.append(f"{name}: missing")
    elif _sha256(root / name) != digest:
      problems.append(f"{name}: sha256 differs from {CHECKSUMS} (corrupted or modified)")
  if problems:
    raise CheckpointError(str(root), other=problems, headline=f"fails its {CHECKSUMS} check")
  return True
