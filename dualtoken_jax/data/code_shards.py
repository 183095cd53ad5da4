"""Pre-computed DualToken codes on disk: one `.npz`, or ArrayRecord shards for large sets.

Each ArrayRecord record is a msgpack map {"key": str, "pixel": int32 (h,w,D), "semantic": int32
(h,w,D)} (flax.serialization), so any grain/ArrayRecord reader can stream them, e.g. to train
the MLLM without running the tokenizer. `read(path)` reads both formats back.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from flax import serialization


def write_npz(path: str | os.PathLike, keys: list[str], pixel: np.ndarray, semantic: np.ndarray) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, keys=np.asarray(keys), pixel=pixel.astype(np.int32), semantic=semantic.astype(np.int32))
  os.replace(tmp, path)


class ShardWriter:
  """Writes records to `{prefix}-{index:05d}.array_record`, `shard_size` records per shard."""

  def __init__(self, directory: str | os.PathLike, shard_size: int = 10000, prefix: str = "codes"):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self._module = array_record_module
    self._dir = Path(directory)
    self._dir.mkdir(parents=True, exist_ok=True)
    self._shard_size, self._prefix = shard_size, prefix
    self._writer, self._in_shard, self._shard = None, 0, 0
    self.paths: list[Path] = []

  def write(self, key: str, pixel: np.ndarray, semantic: np.ndarray) -> None:
    if self._writer is None or self._in_shard == self._shard_size:
      self._roll()
    record = {"key": key, "pixel": np.asarray(pixel, np.int32), "semantic": np.asarray(semantic, np.int32)}
    self._writer.write(serialization.msgpack_serialize(record))
    self._in_shard += 1

  def _roll(self):
    self.close()
    path = self._dir / f"{self._prefix}-{self._shard:05d}.array_record"
    self._writer = self._module.ArrayRecordWriter(str(path), "group_size:1")
    self.paths.append(path)
    self._shard, self._in_shard = self._shard + 1, 0

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def read(path: str | os.PathLike) -> Iterator[dict]:
  """Records {"key", "pixel", "semantic"} from a `.npz` or a directory/glob of ArrayRecord shards."""
  path = str(path)
  if path.endswith(".npz"):
    with np.load(path) as f:
      for key, pix, sem in zip(f["keys"], f["pixel"], f["semantic"]):
        yield {"key": str(key), "pixel": pix, "semantic": sem}
    return
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(path, "*.array_record")) if os.path.isdir(path) else glob.glob(path))
  if not files:
    raise FileNotFoundError(f"no .npz or *.array_record code shards at {path}")
  source = array_record_data_source.ArrayRecordDataSource(files)
  for i in range(len(source)):
    yield serialization.msgpack_restore(source[i])
