"""Webdataset `.tar` shards (the CC12M layout of the reference) as a random-access source.

A webdataset shard is a plain tar whose members are grouped into samples by key: the member
name up to the first "." of its basename. CC12M shards from img2dataset hold `{key}.jpg`,
`{key}.txt` (caption) and `{key}.json` (metadata). This source reads every shard's member
headers once (in parallel threads; tarfile seeks over the payloads) and keeps, per sample, the
byte offset and size of its image inside the shard, in flat numpy arrays (about 40 bytes per
sample plus the key). Reading a record is then one `seek` + `read`. Nothing is ever extracted
or written anywhere.

Members that could be dangerous if someone did extract them - an absolute name, a `..`
component, a link or device entry - are never read: an image-named one becomes a record that
is skipped and counted as "bad_member" every time it comes up, any other is ignored; both are
counted in `index_stats`. A shard truncated mid-header keeps the samples indexed before the
damage; a member whose bytes run past the end of its file is skipped as a "read_error".

A shard that is not a tar at all (an empty file from a failed download) is skipped with a
warning and counted in `index_stats["unreadable_shards"]`. Only uncompressed tars are
supported, since random access needs stable byte offsets; a compressed one is an error.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import logging
import os
import posixpath
import re
import tarfile
from typing import Any, Sequence

import numpy as np

from dualtoken_jax.data import decode
from dualtoken_jax.data import records
from dualtoken_jax.data import sources

WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTENSIONS = ("txt", "json")

# gzip, bzip2, xz, zstd.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
_BRACE_GROUP = re.compile(r"\{([^{}]*)\}")
_NUMERIC_RANGE = re.compile(r"(\d+)\.\.(\d+)")


@dataclasses.dataclass
class _ShardIndex:
  keys: list[str]
  offsets: list[int]
  sizes: list[int]
  caption_offsets: list[int]
  caption_sizes: list[int]   # -1: no caption
  caption_is_json: list[bool]
  bad: list[bool]
  bad_members: int = 0        # unsafe names or non-regular entries, image-named or not
  ignored_members: int = 0    # neither an image nor a caption
  truncated: bool = False     # the shard's headers end in garbage or mid-header
  unreadable: bool = False    # not a tar at all (e.g. an empty or failed download)


class WebDatasetSource:
  """Random access to the samples of webdataset tar shards.

  Args:
    shards: tar paths, glob patterns or webdataset brace patterns
      ("cc12m-train-{0000..2175}.tar"), or a list of them. Expansion order is kept; globs
      are sorted.
    image_extensions: member extensions (after the key's first ".", lower-cased) holding the
      image; when a sample has several, the first in this order wins.
    with_captions: add a `caption` field (the `.txt` member, else `.json`'s "caption") to each
      record, for later MLLM use. Tokenizer training leaves it off.
    num_index_threads: shards indexed in parallel.
    max_bytes: an image member larger than this is skipped as "too_large", unread.
  """

  def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], *,
               image_extensions: Sequence[str] = WEBDATASET_IMAGE_EXTENSIONS,
               with_captions: bool = False, num_index_threads: int = 16,
               max_bytes: int = decode.DEFAULT_MAX_BYTES):
    self._max_bytes = max_bytes
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    expanded = [p for pattern in patterns for p in expand_braces(os.fspath(pattern))]
    self._paths = sources.expand_paths(expanded, what="webdataset .tar shards")
    self._image_exts = tuple(e.lower().lstrip(".") for e in image_extensions)
    self._with_captions = with_captions

    with concurrent.futures.ThreadPoolExecutor(max(1, min(num_index_threads,
                                                          len(self._paths)))) as pool:
      shard_indices = list(pool.map(self._index_shard, self._paths))

    counts = [len(s.keys) for s in shard_indices]
    self._shard = np.repeat(np.arange(len(self._paths), dtype=np.int32), counts)
    cat = lambda field, dtype: np.fromiter(
        itertools.chain.from_iterable(getattr(s, field) for s in shard_indices), dtype=dtype,
        count=len(self._shard))
    self._offset = cat("offsets", np.int64)
    self._size = cat("sizes", np.int64)
    self._caption_offset = cat("caption_offsets", np.int64)
    self._caption_size = cat("caption_sizes", np.int64)
    self._caption_is_json = cat("caption_is_json", bool)
    self._bad = cat("bad", bool)
    self._keys = np.array([k.encode("utf-8") for s in shard_indices for k in s.keys],
                          dtype=np.bytes_)
    self.index_stats = {
        "shards": len(self._paths),
        "samples": len(self._shard),
        "bad_members": sum(s.bad_members for s in shard_indices),
        "ignored_members": sum(s.ignored_members for s in shard_indices),
        "truncated_shards": sum(s.truncated for s in shard_indices),
        "unreadable_shards": sum(s.unreadable for s in shard_indices),
    }
    logging.info("WebDatasetSource indexed %s", self.index_stats)
    if not len(self._shard):
      raise ValueError(f"no images found in {len(self._paths)} tar shard(s) (first: "
                       f"{self._paths[0]!r}; looked for members ending in "
                       f"{', '.join('.' + e for e in self._image_exts)})")

  def __len__(self) -> int:
    return len(self._shard)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    path = self._paths[self._shard[index]]
    key = f"{os.path.basename(path)}/{self._keys[index].decode('utf-8')}"
    if self._bad[index]:
      return records.skip_record("bad_member", key, "unsafe tar member name or type")
    if self._size[index] > self._max_bytes:
      return records.skip_record("too_large", key, f"{self._size[index]} bytes exceeds "
                                 f"max_bytes={self._max_bytes}")
    try:
      data = _read_range(path, self._offset[index], self._size[index])
      record = {"key": key, "image_bytes": data}
      if self._with_captions:
        record["caption"] = self._caption(path, index)
      return record
    except OSError as e:
      return records.read_failure(key, e)

  def __repr__(self) -> str:
    return (f"WebDatasetSource(shards={len(self._paths)}, first={self._paths[0]!r}, "
            f"samples={len(self)})")

  def _caption(self, path: str, index: int) -> str | None:
    if self._caption_size[index] < 0:
      return None
    text = _read_range(path, self._caption_offset[index],
                       self._caption_size[index]).decode("utf-8", errors="replace")
    if not self._caption_is_json[index]:
      return text.strip()
    try:
      meta = json.loads(text)
    except ValueError:
      return None
    caption = meta.get("caption") if isinstance(meta, dict) else None
    return caption if isinstance(caption, str) else None

  def _index_shard(self, path: str) -> _ShardIndex:
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    bad_keys: dict[str, None] = {}  # Ordered set of image-named unsafe members.
    stats = _ShardIndex([], [], [], [], [], [], [])
    try:
      tar = tarfile.open(path, mode="r:")
    except tarfile.ReadError as e:
      with open(path, "rb") as f:
        magic = f.read(6)
      if magic.startswith(_COMPRESSED_MAGIC):
        raise ValueError(f"{path!r} is a compressed tar; webdataset shards must be plain "
                         f".tar for random access (decompress them once)") from e
      # One broken download among thousands of shards must not stop the run.
      logging.warning("skipping unreadable tar shard %s: %s", path, e)
      stats.unreadable = True
      return stats
    with tar:
      try:
        for member in tar:  # Reads headers only; tarfile seeks over the payloads.
          name = member.name
          key, ext = _split_key(name)
          if _is_unsafe(name) or not (member.isfile() or member.isdir()):
            stats.bad_members += 1
            if ext in self._image_exts:
              bad_keys.setdefault(name)
            continue
          if member.isdir():
            continue
          if ext in self._image_exts or ext in CAPTION_EXTENSIONS:
            samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
          else:
            stats.ignored_members += 1
        # tarfile ends iteration silently at a bad header past the first one.
        if not _at_end_marker(tar):
          raise tarfile.ReadError(f"invalid tar header at byte {tar.offset}")
      except (tarfile.TarError, EOFError, OSError) as e:
        logging.warning("tar shard %s is damaged after %d samples (%s); keeping those",
                        path, len(samples), e)
        stats.truncated = True

    for key, fields in samples.items():
      image_ext = next((e for e in self._image_exts if e in fields), None)
      if image_ext is None:
        stats.ignored_members += len(fields)  # A caption without an image.
        continue
      caption_ext = next((e for e in CAPTION_EXTENSIONS if e in fields), None)
      offset, size = fields[image_ext]
      cap_offset, cap_size = fields[caption_ext] if caption_ext else (0, -1)
      _append(stats, key, offset, size, cap_offset, cap_size, caption_ext == "json", False)
    for name in bad_keys:
      _append(stats, name, 0, 0, 0, -1, False, True)
    return stats


def expand_braces(pattern: str) -> list[str]:
  """Webdataset/bash brace expansion: "a-{000..002}.tar" -> ["a-000.tar", "a-001.tar", ...].

  Groups expand left to right; "{x,y}" alternatives expand too; numeric ranges are
  zero-padded to the width of their start when it has a leading zero (or both ends have the
  same width), as in bash.
  """
  for match in _BRACE_GROUP.finditer(pattern):
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numeric = _NUMERIC_RANGE.fullmatch(body)
    if numeric:
      start, stop = numeric.groups()
      width = len(start) if start.startswith("0") or len(start) == len(stop) else 0
      options = [f"{i:0{width}d}" for i in range(int(start), int(stop) + 1)]
    elif "," in body:
      options = body.split(",")
    else:
      continue  # A literal "{...}".
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]
  return [pattern]


def _split_key(name: str) -> tuple[str, str]:
  """Webdataset's key/extension split: the key ends at the basename's first "."."""
  if name.startswith("./"):
    name = name[2:]
  dirname, base = posixpath.split(name)
  stem, dot, ext = base.partition(".")
  if not dot:
    return name, ""
  return posixpath.join(dirname, stem), ext.lower()


def _is_unsafe(name: str) -> bool:
  return (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None
          or ".." in re.split(r"[/\\]", name))


def _at_end_marker(tar: tarfile.TarFile) -> bool:
  """Whether iteration stopped at a zero block (tar's end marker) or at the end of the file."""
  tar.fileobj.seek(tar.offset)
  return not tar.fileobj.read(tarfile.BLOCKSIZE).strip(b"\0")


def _append(stats: _ShardIndex, key, offset, size, cap_offset, cap_size, cap_json, bad):
  stats.keys.append(key)
  stats.offsets.append(offset)
  stats.sizes.append(size)
  stats.caption_offsets.append(cap_offset)
  stats.caption_sizes.append(cap_size)
  stats.caption_is_json.append(cap_json)
  stats.bad.append(bad)


def _read_range(path: str, offset: int, size: int) -> bytes:
  with open(path, "rb") as f:
    f.seek(int(offset))
    data = f.read(int(size))
  if len(data) != size:
    raise OSError(f"{path}: member at byte {offset} is truncated ({len(data)} of {size} bytes)")
  return data
