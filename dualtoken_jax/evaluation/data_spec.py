"""`--data SPEC` -> a random-access image source for the eval pipeline, with class labels.

Specs (the sources of `dualtoken_jax.data`, as in training):

  sample                        the photos bundled with installed packages (smoke runs)
  DIR | folder:DIR              every image under DIR (recursive, sorted relative paths)
  tar:PATTERN | *.tar | {a..b}  webdataset tar shards ("val-{0000..0063}.tar", globs)
  arrayrecord:PATTERN           ArrayRecord files of serialized tf.train.Examples (TFDS layout)
  tfds:NAME[:SPLIT]             `tfds.data_source(NAME, split=SPLIT)` (needs tensorflow_datasets)

Labels (zero-shot only), by source:
  * image folder: when every image sits in a subfolder, the label of `class_dir/…/x.jpg` is
    the index of `class_dir` among the sorted subfolder names: torchvision's `ImageFolder`
    rule, which gives the standard ImageNet ids for `val/n01440764/…` folders.
  * ArrayRecord / TFDS: the integer feature `label_key` ("label") of each record.
  * any source: `labels_file`, lines `KEY,LABEL` (or whitespace-separated), KEY being the
    record's key (folder: the relative path or, if unique, the file name).

The eval pipeline carries only a string key per image, so a labelled source appends the label
to the key (`key + LABEL_SEP + label`); `split_key` takes it apart again.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import numpy as np

from dualtoken_jax import data
from dualtoken_jax.data import sources
from dualtoken_jax.data import tf_example

LABEL_SEP = "\x1f"  # ASCII unit separator: never part of a file name or a TFDS key.
_KEY_FEATURE = "__dualtoken_eval_key__"


@dataclasses.dataclass
class EvalSource:
  """A random-access source for `data.make_eval_dataset` plus what is known about its labels.

  Attributes:
    source: records `{"key", "image_bytes" | "image"}`; keys carry labels when `labelled`.
    description: the spec, for reports and the resume fingerprint.
    labelled: whether keys carry class labels.
    num_classes: the number of classes the source itself implies (folder: subfolders; TFDS:
      its `label` feature), or None when unknown until the labels are read.
    class_folders: the folder names in label order (image folders only).
  """
  source: Any
  description: str
  labelled: bool = False
  num_classes: int | None = None
  class_folders: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.source)


def split_key(key: str) -> tuple[str, int | None]:
  """`key + LABEL_SEP + label` -> (key, label); a key without a label -> (key, None)."""
  key = str(key)
  base, sep, label = key.rpartition(LABEL_SEP)
  if not sep:
    return key, None
  return base, int(label)


def open_source(spec: str, *, with_labels: bool = False, labels_file: str | None = None,
                image_key: str = "image", label_key: str = "label",
                key_feature: str | None = None, max_images: int | None = None,
                tfds_data_dir: str | None = None) -> EvalSource:
  """Parses `spec` (module docstring) and opens the source; labels only if `with_labels`."""
  kind, path = _parse(spec)
  num_classes, folders, labelled = None, (), False
  if kind == "sample":
    source = data.SamplePhotosSource()
  elif kind == "folder":
    source = data.ImageFolderSource(path)
  elif kind == "tar":
    source = data.WebDatasetSource(path)
  elif kind in ("arrayrecord", "tfds"):
    raw, num_classes = (_array_records(path) if kind == "arrayrecord"
                        else _tfds_source(path, tfds_data_dir, label_key))
    if with_labels and not labels_file:
      raw = _LabelledRecords(raw, label_key=label_key, key_feature=key_feature)
      key_feature, labelled = _KEY_FEATURE, True
    source = sources.RecordSource(raw, image_key=image_key, key_feature=key_feature,
                                  record_format="tf_example", name=spec)
  else:
    raise AssertionError(kind)

  if with_labels and not labelled:
    if labels_file:
      label_of, num_classes = _file_label_lookup(labels_file), None
    elif kind == "folder":  # From the whole folder, so --max_images keeps the label ids.
      by_index, folders = _labels_from_folders(source.keys, path)
      label_of, num_classes = (lambda index, key: int(by_index[index])), len(folders)
    else:
      raise ValueError(f"zero-shot needs class labels, and {spec!r} has none: use an image "
                       "folder with one subfolder per class, an ArrayRecord/TFDS source with a "
                       f"{label_key!r} feature, or --labels FILE (lines 'KEY,LABEL')")
    source = _KeyLabels(source, label_of)
    labelled = True
  if max_images is not None:
    if max_images <= 0:
      raise ValueError(f"max_images must be positive, got {max_images}")
    source = _Prefix(source, max_images)
  return EvalSource(source, spec, labelled, num_classes, folders)


def _parse(spec: str) -> tuple[str, str]:
  spec = str(spec)
  if spec == "sample":
    return "sample", ""
  prefix, sep, rest = spec.partition(":")
  if sep and prefix in ("folder", "tar", "arrayrecord", "tfds") and len(prefix) > 1:
    if not rest:
      raise ValueError(f"data spec {spec!r} names no path after '{prefix}:'")
    return prefix, rest
  if os.path.isdir(spec):
    return "folder", spec
  if spec.endswith(".tar") or re.search(r"\{[^{}]*\}", spec):  # a webdataset brace pattern
    return "tar", spec
  if re.search(r"\.array_?record", spec):
    return "arrayrecord", spec
  raise ValueError(f"cannot tell what data spec {spec!r} is: expected 'sample', an existing "
                   "directory, 'folder:DIR', 'tar:PATTERN' (or a .tar / {000..099} pattern), "
                   "'arrayrecord:PATTERN' or 'tfds:NAME[:SPLIT]'")


def _array_records(pattern: str):
  import grain  # pylint: disable=g-import-not-at-top
  files = sources.expand_paths(pattern, what="ArrayRecord files")
  return grain.sources.ArrayRecordDataSource(files), None


def _tfds_source(name_split: str, data_dir: str | None, label_key: str):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("tfds: data specs need tensorflow_datasets (pip install "
                      "tensorflow-datasets); or point arrayrecord:PATTERN at the prepared "
                      "*.array_record files directly") from e
  name, _, split = name_split.partition(":")
  split = split or "validation"
  # download=False: the data must already be prepared under data_dir; nothing is fetched.
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
  try:
    feature = tfds.builder(name, data_dir=data_dir).info.features[label_key]
  except KeyError:
    feature = None
  return source, getattr(feature, "num_classes", None)


def _labels_from_folders(keys: list[str], root: str) -> tuple[np.ndarray, tuple[str, ...]]:
  loose = [k for k in keys if "/" not in k]
  if loose:
    raise ValueError(f"zero-shot on an image folder needs one subfolder per class, but "
                     f"{len(loose)} image(s) sit directly in {root!r} (e.g. {loose[0]!r}); "
                     "or pass --labels FILE")
  folders = tuple(sorted({k.split("/", 1)[0] for k in keys}))
  index = {f: i for i, f in enumerate(folders)}
  return np.array([index[k.split("/", 1)[0]] for k in keys], np.int64), folders


def read_labels_file(path: str | os.PathLike) -> dict[str, int]:
  """`KEY,LABEL` or `KEY LABEL` lines (a non-numeric first line is a header) -> {key: label}."""
  out: dict[str, int] = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
      if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
        if n == 1:
          continue  # header
        raise ValueError(f"{path}:{n}: expected 'KEY,LABEL' with an integer label, got {line!r}")
      out[parts[0].strip()] = int(parts[1])
  if not out:
    raise ValueError(f"{path} holds no 'KEY,LABEL' lines")
  return out


def _file_label_lookup(path: str) -> Callable[[int, str], int]:
  """label(index, key) from a labels file: by the key, else by its file name."""
  table = read_labels_file(path)

  def label(index: int, key: str) -> int:
    del index
    for name in (key, key.rsplit("/", 1)[-1]):
      if name in table:
        return table[name]
    raise KeyError(f"{path} has no label for image {key!r} (looked up by key and by file name)")

  return label


def _unique_basenames(keys: list[str]) -> dict[str, str]:
  names = [k.rsplit("/", 1)[-1] for k in keys]
  counts: dict[str, int] = {}
  for n in names:
    counts[n] = counts.get(n, 0) + 1
  return {k: n for k, n in zip(keys, names) if counts[n] == 1}


class _Prefix:
  """The first `n` records of a source (`--max_images`)."""

  def __init__(self, source, n: int):
    self._source, self._n = source, min(int(n), len(source))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int):
    if not 0 <= index < self._n:
      raise IndexError(index)
    return self._source[index]

  @property
  def keys(self) -> list[str]:
    return list(self._source.keys)[:self._n]

  def __repr__(self) -> str:
    return f"{self._source!r}[:{self._n}]"


class _KeyLabels:
  """Appends `LABEL_SEP + label_of(index, key)` to each record's key."""

  def __init__(self, source, label_of: Callable[[int, str], int]):
    self._source, self._label_of = source, label_of

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    record = dict(self._source[index])
    record["key"] = f"{record['key']}{LABEL_SEP}{int(self._label_of(index, record['key']))}"
    return record

  def __repr__(self) -> str:
    return f"labelled({self._source!r})"


class _LabelledRecords:
  """Raw records (serialized tf.Examples or feature dicts) -> feature dicts whose extra
  `_KEY_FEATURE` holds `key + LABEL_SEP + label`; `RecordSource` then uses it as the key."""

  def __init__(self, raw, *, label_key: str, key_feature: str | None):
    self._raw, self._label_key, self._key_feature = raw, label_key, key_feature

  def __len__(self) -> int:
    return len(self._raw)

  def __getitem__(self, index: int):
    record = self._raw[int(index)]
    if isinstance(record, (bytes, bytearray, memoryview)):
      try:
        record = tf_example.parse_example(bytes(record))
      except ValueError:
        return record  # RecordSource parses it again and counts it as a decode error.
    record = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in record.items()}
    if self._label_key not in record:
      raise KeyError(f"record {index} has no label feature {self._label_key!r} (features: "
                     f"{sorted(record)}); set --label_key, or pass --labels FILE")
    label = int(np.asarray(record[self._label_key]).reshape(-1)[0])
    base = _as_str(record[self._key_feature]) if self._key_feature else str(index)
    record[_KEY_FEATURE] = f"{base}{LABEL_SEP}{label}"
    return record

  def __repr__(self) -> str:
    return f"labelled({self._raw!r})"


def _as_str(value: Any) -> str:
  if isinstance(value, list) and len(value) == 1:
    value = value[0]
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  return str(np.asarray(value).reshape(-1)[0]) if isinstance(value, np.ndarray) else str(value)


# ---------------------------------------------------------------- captions (retrieval)
def read_captions(path: str | os.PathLike) -> list[tuple[str, str]]:
  """(image name, caption) pairs from a Flickr8K/30K caption file, in file order.

  Accepted layouts:
    * `captions.txt` (the Kaggle Flickr8K/30K release): a header `image,caption`, then
      `IMAGE,CAPTION` lines. Captions may contain commas, so a line is split at its first comma
      only; a caption in double quotes is unquoted (CSV rules).
    * `Flickr8k.token.txt` / `results_20130124.token`: `IMAGE#N<TAB>CAPTION`.
  """
  import csv  # pylint: disable=g-import-not-at-top
  pairs = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      if "\t" in line:
        image, caption = line.split("\t", 1)
        image = re.sub(r"#\d+$", "", image.strip())
      elif "," in line:
        image, caption = line.split(",", 1)
        if caption.startswith('"'):
          caption = next(csv.reader([caption]))[0]
      else:
        raise ValueError(f"{path}:{n}: expected 'IMAGE,CAPTION' or 'IMAGE#N<TAB>CAPTION', got "
                         f"{line!r}")
      image, caption = image.strip(), caption.strip()
      if n == 1 and image.lower() in ("image", "image_name", "filename", "file_name"):
        continue  # header
      if not caption:
        raise ValueError(f"{path}:{n}: empty caption for {image!r}")
      pairs.append((image, caption))
  if not pairs:
    raise ValueError(f"{path} holds no captions")
  return pairs


def match_caption_images(pairs: list[tuple[str, str]], keys: list[str]
                         ) -> Callable[[str], str | None]:
  """A function: source key -> the caption file's image name it is (or None).

  A key matches an image name equal to it or, when file names are unique, to its file name.
  """
  names = {image for image, _ in pairs}
  by_name = _unique_basenames(keys)

  def lookup(key: str) -> str | None:
    if key in names:
      return key
    name = by_name.get(key)
    return name if name in names else None

  return lookup

