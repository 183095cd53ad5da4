"""Random-access image sources: image folders, ArrayRecord files and `tfds.data_source`s.

Every source here is a grain random-access data source (`__len__`, `__getitem__`, a `__repr__`
for DataLoader checkpoints, picklable for worker processes) whose records follow
`records.py`: `{"key": str, "image_bytes": bytes}` or `{"key": str, "image": uint8 array}`.
An I/O error while reading one record returns a skip record instead of raising, so a file
that disappears mid-run costs one sample, not the run. Record order is deterministic and
identical on every host, which the pipeline's global shuffle + per-host slicing relies on.

Webdataset tar shards are in `webdataset.py`, the bundled demo photos in `sample_photos.py`.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from dualtoken_jax.data import decode
from dualtoken_jax.data import records
from dualtoken_jax.data import tf_example

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RECORD_FORMATS = ("tf_example", "raw")


class ImageFolderSource:
  """Every image file under a directory, recursively, in sorted relative-path order.

  Keys are paths relative to `root` with "/" separators. Files and directories whose name
  starts with "." are ignored (macOS `._*` resource forks are not images). Symlinked
  directories are not followed. Only regular files (symlinks followed) are read, at most
  `max_bytes` of each (`decode.read_image_file`): a FIFO or device is skipped as "not_a_file",
  a bigger file as "too_large".
  """

  def __init__(self, root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS,
               max_bytes: int = decode.DEFAULT_MAX_BYTES):
    self._root = os.fspath(root)
    self._max_bytes = max_bytes
    if not os.path.isdir(self._root):
      raise FileNotFoundError(f"image folder {self._root!r} does not exist or is not a directory")
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    paths = []
    for dirpath, dirnames, filenames in os.walk(self._root):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      for name in filenames:
        if not name.startswith(".") and name.lower().endswith(exts):
          paths.append(os.path.relpath(os.path.join(dirpath, name), self._root))
    if not paths:
      raise ValueError(f"no images found under {self._root!r} (looked for {', '.join(exts)})")
    self._keys = sorted(p.replace(os.sep, "/") for p in paths)

  def __len__(self) -> int:
    return len(self._keys)

  @property
  def keys(self) -> list[str]:
    """Relative paths of the images, in source order."""
    return list(self._keys)

  def __getitem__(self, index: int) -> dict[str, Any]:
    key = self._keys[index]
    try:
      return {"key": key, "image_bytes": decode.read_image_file(os.path.join(self._root, key),
                                                                max_bytes=self._max_bytes)}
    except decode.SkipImage as e:
      return records.skip_record(e.reason, key, str(e))
    except OSError as e:
      return records.read_failure(key, e)

  def __repr__(self) -> str:
    return f"ImageFolderSource(root={self._root!r}, num_images={len(self)})"


class RecordSource:
  """Adapts any random-access source of images, e.g. what `tfds.data_source(...)` returns.

  Each record of `source` may be
  - a mapping of features (TFDS): the image is `record[image_key]`, either encoded bytes or a
    decoded uint8 array;
  - bytes: a serialized `tf.train.Example` (`record_format="tf_example"`, the TFDS on-disk
    format) whose `image_key` feature holds the encoded image, or the encoded image itself
    (`record_format="raw"`).

  Keys come from the `key_feature` (e.g. TFDS's "file_name" or "tfds_id") when given, else
  from the record index. Passing a TFDS source:

    src = tfds.data_source("imagenet2012", split="validation",
                           decoders={"image": tfds.decode.SkipDecoding()})
    source = RecordSource(src, image_key="image", key_feature="file_name")

  `SkipDecoding` hands over the encoded bytes so that this package's decoder (mode handling,
  size limit, bad-sample counting) is used; without it, TFDS's decoded arrays are accepted.

  Raises (on access): KeyError if a record lacks `image_key`. That is a configuration error,
  not a bad sample, so it stops the run with the feature names that do exist.
  """

  def __init__(self, source: Any, *, image_key: str = "image", key_feature: str | None = None,
               record_format: str = "tf_example", name: str | None = None):
    if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
      raise TypeError(f"source must support len() and [index] (grain's random-access "
                      f"protocol), got {type(source).__name__}")
    if record_format not in RECORD_FORMATS:
      raise ValueError(f"record_format must be one of {RECORD_FORMATS}, got {record_format!r}")
    self._source = source
    self._image_key = image_key
    self._key_feature = key_feature
    self._record_format = record_format
    self._name = name or type(source).__name__

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    default_key = f"{self._name}/{index}"
    try:
      record = self._source[index]
    except OSError as e:
      return records.read_failure(default_key, e)
    if isinstance(record, (bytes, bytearray, memoryview)):
      record = bytes(record)
      if self._record_format == "raw":
        return {"key": default_key, "image_bytes": record}
      try:
        record = tf_example.parse_example(record)
      except ValueError as e:
        return records.skip_record("decode_error", default_key, f"bad tf.train.Example: {e}")
      record = {name: values[0] if len(values) == 1 else values
                for name, values in record.items()}
    if not isinstance(record, Mapping):
      raise TypeError(f"record {index} of {self._name} is a {type(record).__name__}; "
                      f"expected bytes or a mapping of features")
    if self._image_key not in record:
      raise KeyError(f"record {index} of {self._name} has no feature {self._image_key!r} "
                     f"(features: {sorted(record)}); set image_key")
    key = _key_string(record[self._key_feature]) if self._key_feature else default_key
    image = record[self._image_key]
    if isinstance(image, list):  # A tf.Example feature with no or several values.
      if len(image) != 1:
        return records.skip_record(
            "empty" if not image else "decode_error", key,
            f"feature {self._image_key!r} holds {len(image)} values, expected 1")
      image = image[0]
    if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
      return {"key": key, "image_bytes": bytes(image)}
    return {"key": key, "image": np.asarray(image)}

  def __repr__(self) -> str:
    return (f"RecordSource(source={self._name}, image_key={self._image_key!r}, "
            f"num_records={len(self)})")


class ArrayRecordSource(RecordSource):
  """ArrayRecord files (e.g. a TFDS dataset prepared with `file_format="array_record"`).

  Args:
    paths: files, glob patterns, or a list of either; globs are sorted, lists keep order.
    image_key, key_feature, record_format: as in `RecordSource`; the default reads TFDS's
      serialized `tf.train.Example`s (image feature "image").
  """

  def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
               image_key: str = "image", key_feature: str | None = None,
               record_format: str = "tf_example"):
    files = expand_paths(paths, what="ArrayRecord files")
    super().__init__(grain.sources.ArrayRecordDataSource(files), image_key=image_key,
                     key_feature=key_feature, record_format=record_format,
                     name=f"ArrayRecordSource[{len(files)} files]")


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                 what: str) -> list[str]:
  """Files named by `paths` (files or glob patterns); raises naming the patterns if none.

  Every file, named or matched, must be a regular file (symlinks followed;
  `decode.check_regular_file`), so a FIFO matched by `shards/*.tar` is refused, never opened.

  Raises:
    FileNotFoundError: a named path that does not exist.
    ValueError: no file matched, or a path is not a regular file (FIFO, device, directory...).
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files: list[str] = []
  for pattern in map(os.fspath, paths):
    if glob.has_magic(pattern):
      matched = sorted(glob.glob(pattern))
    elif os.path.exists(pattern):
      matched = [pattern]
    else:
      raise FileNotFoundError(f"{what}: {pattern!r} does not exist")
    for path in matched:
      try:
        decode.check_regular_file(path)
      except decode.SkipImage as e:
        by = f" (matched by {pattern!r})" if path != pattern else ""
        raise ValueError(f"{what}: {e}{by}") from None
    files.extend(matched)
  if not files:
    raise ValueError(f"no {what} matched {[os.fspath(p) for p in paths]}")
  return files


def _key_string(value: Any) -> str:
  if isinstance(value, list) and len(value) == 1:
    value = value[0]
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _key_string(value.item())
  return str(value)
