"""Pre-computed DualToken codes on disk: one `.npz`, or ArrayRecord shards for large sets.

Each ArrayRecord record is a msgpack map {"key": str, "pixel": int32 (h,w,D), "semantic": int32
(h,w,D)} (flax.serialization), so any grain/ArrayRecord reader can stream them, e.g. to train
the MLLM without running the tokenizer. `read(path)` reads both formats back.

A shard directory is crash- and re-run-safe: each shard is written under a temporary name
(`*.array_record.tmp`) and renamed when complete, its keys go to a sidecar
`<shard>.keys.json` (a JSON list, written atomically before the shard is listed), and
`manifest.json` lists the complete shards: file, record count, size and the sha256 of the
sidecar, a constant size per shard whatever the keys, so completing a shard costs O(shard)
I/O. A `ShardWriter` opened on a directory that has a manifest resumes it (its `done_keys`,
read from the sidecars, are the inputs to skip), or clears it with `overwrite`; `read(dir)` /
`shard_files(dir)` refuse a directory whose shards disagree with its manifest (an extra,
missing, empty, resized or unreadable shard), naming the file. Reading needs no sidecars;
resuming refuses a missing or altered one, naming it.

Several writers (the hosts of a multi-process `tokenize`) share one directory: writer `host=h`
names its shards `{prefix}-h{h:05d}-{index:05d}.array_record` and lists them in its own manifest
part `manifest-h{h:05d}.json` (a single writer keeps `{prefix}-{index}` and `manifest.json`);
readers take the union of every part. One part per host, merged by readers, rather than process
0 merging one manifest after a barrier: a host never writes another's file (no clobbering, no
lock), a completed shard is durable the moment its host lists it even if another host is
killed (process 0 would need every host alive to merge), and tokenising needs no collective at
all. A writer's `done_keys` are the keys of every part (unless `overwrite`), so a re-run with
any process count skips what any host finished; each writer only touches its own files, except
that process 0 (`clean_others`) also clears what writers outside the current job left behind.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
from flax import serialization

from dualtoken_jax.bridges.tensor_files import atomic_target
from dualtoken_jax.bridges.tensor_files import write_npz as _write_arrays

MANIFEST = "manifest.json"
_PART = "manifest-h{:05d}.json"  # a host's manifest part
_HOST_SHARD = re.compile(r"-h\d{5}-\d+\.array_record$")
_FORMAT = "dualtoken_jax code shards"
_VERSION = 2
_SUFFIX, _TMP, _KEYS = ".array_record", ".array_record.tmp", ".array_record.keys.json"


class ShardDirectoryError(ValueError):
  """A shard directory whose files disagree with its manifest (the message names the file)."""


def write_npz(path: str | os.PathLike, keys: list[str], pixel: np.ndarray, semantic: np.ndarray) -> None:
  """All codes in one `.npz` at `path`, written atomically (temporary file beside it)."""
  _write_arrays(path, {"keys": np.asarray(keys), "pixel": pixel.astype(np.int32),
                       "semantic": semantic.astype(np.int32)})


class ShardWriter:
  """Writes records to `{prefix}-{index:05d}.array_record`, `shard_size` records per shard.

  Each shard is written under a temporary name and renamed, its keys written to its sidecar,
  then listed in `manifest.json`, when it is complete (`shard_size` records, or `close`). On a directory with a manifest the
  writer resumes: `done_keys` holds the keys of its complete shards, new shards are numbered
  after them (a shard size may differ from the earlier run's), and writing a key twice raises.
  `overwrite=True` first removes every shard, temporary shard and the manifest.

  With `host=h` (one of `hosts` writers sharing the directory, see the module docstring) the
  shards are `{prefix}-h{h:05d}-…` listed in `manifest-h{h:05d}.json`; `done_keys` holds every
  part's keys; `overwrite` and the clean-up of an interrupted run touch only this writer's files,
  plus, with `clean_others` (host 0), those of writers outside the job (the single writer, hosts
  >= `hosts`).

  Raises (on opening): ShardDirectoryError for shards without a manifest, or shards that
  disagree with it (use `overwrite`).
  """

  def __init__(self, directory: str | os.PathLike, shard_size: int = 10000, prefix: str = "codes",
               overwrite: bool = False, host: int | None = None, clean_others: bool = True,
               hosts: int = 1):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    if shard_size <= 0:
      raise ValueError(f"shard_size must be positive, got {shard_size}")
    self._module = array_record_module
    self._dir = Path(directory)
    self._dir.mkdir(parents=True, exist_ok=True)
    self._shard_size = shard_size
    self._prefix = prefix if host is None else f"{prefix}-h{host:05d}"
    self._manifest = MANIFEST if host is None else _PART.format(host)
    self._writer = self._target = self._tmp = None
    self._keys: list[str] = []
    mine = [(self._prefix, self._manifest)]
    others = []
    if host is None or clean_others:  # writers that are not running now
      others = [w for w in _writers(self._dir, prefix)
                if w != mine[0] and (host is None or w[1] == MANIFEST
                                     or int(w[1][len("manifest-h"):-len(".json")]) >= hosts)]
    for writer_prefix, manifest in mine + others:
      # An interrupted run's unfinished shard, sidecar or manifest.
      for stale in [*_own(self._dir, writer_prefix, (_TMP, _KEYS + ".tmp")),
                    self._dir / (manifest + ".tmp")]:
        stale.unlink(missing_ok=True)
      if overwrite:
        for old in [*_own(self._dir, writer_prefix, (_SUFFIX, _KEYS)), self._dir / manifest]:
          old.unlink(missing_ok=True)
      elif (writer_prefix, manifest) != mine[0]:
        _resumable_shards(self._dir, writer_prefix, manifest)  # drops its unlisted shards
    self._shards = _resumable_shards(self._dir, self._prefix, self._manifest)
    self.done_keys = _done_keys(self._dir, self._shards)
    if not overwrite:  # what the other writers (hosts) completed is done too
      for part in _parts(self._dir):
        if part != self._manifest:
          self.done_keys |= _done_keys(self._dir, _read_part(self._dir / part), self.done_keys)
    self._shard = 1 + max((_index(e["file"], self._prefix) for e in self._shards), default=-1)
    self.paths: list[Path] = []  # the shards written by this writer

  def write(self, key: str, pixel: np.ndarray, semantic: np.ndarray) -> None:
    if key in self.done_keys:
      raise ValueError(f"key {key!r} is already in a shard of {self._dir}")
    if self._writer is None:
      self._open()
    record = {"key": key, "pixel": np.asarray(pixel, np.int32), "semantic": np.asarray(semantic, np.int32)}
    self._writer.write(serialization.msgpack_serialize(record))
    self._keys.append(key)
    self.done_keys.add(key)
    if len(self._keys) == self._shard_size:
      self._finish()

  def _open(self):
    path = self._dir / f"{self._prefix}-{self._shard:05d}{_SUFFIX}"
    self._target = atomic_target(path)
    self._tmp = self._target.__enter__()  # pylint: disable=unnecessary-dunder-call
    self._writer = self._module.ArrayRecordWriter(str(self._tmp), "group_size:1")
    self.paths.append(path)
    self._shard += 1

  def _finish(self):
    self._writer.close()
    path = self.paths[-1]
    keys = json.dumps(self._keys).encode()
    with atomic_target(_sidecar(path)) as tmp:  # before the rename: a listed shard has one
      tmp.write_bytes(keys)
    self._target.__exit__(None, None, None)  # renames it to its final name
    self._shards.append({"file": path.name, "records": len(self._keys),
                         "bytes": path.stat().st_size,
                         "keys_sha256": hashlib.sha256(keys).hexdigest()})
    _write_manifest(self._dir, self._shards, self._manifest)  # O(shards) bytes, not O(keys)
    self._writer, self._target, self._keys = None, None, []

  def close(self):
    """Completes the shard in progress (if it has records)."""
    if self._writer is not None:
      self._finish()

  def abort(self):
    """Drops the shard in progress (after an error): the complete shards stay, resumable."""
    if self._writer is not None:
      self._writer.close()
      Path(self._tmp).unlink(missing_ok=True)
      self.done_keys.difference_update(self._keys)
      self._writer, self._target, self._keys = None, None, []


def _index(name: str, prefix: str) -> int:
  """The number of a shard (or of its sidecar) named `{prefix}-{index}`, else -1."""
  m = re.fullmatch(re.escape(prefix) + r"-(\d+)(?:" + re.escape(_SUFFIX) + "|" + re.escape(_KEYS)
                   + ")", name)
  return int(m.group(1)) if m else -1


def _own(directory: Path, prefix: str, suffixes) -> list[Path]:
  """The files `{prefix}-{index}{suffix}` of `directory` (not those of a longer prefix)."""
  pattern = re.compile(re.escape(prefix) + r"-\d+(?:" + "|".join(map(re.escape, suffixes)) + ")")
  return sorted(p for p in directory.glob(prefix + "-*") if pattern.fullmatch(p.name))


def _writers(directory: Path, prefix: str) -> list[tuple[str, str]]:
  """(shard prefix, manifest name) of every writer with a file in `directory`."""
  found = set()
  for p in directory.glob(prefix + "-*"):
    m = re.fullmatch(re.escape(prefix) + r"(-h(\d+))?-\d+\..*", p.name)
    if m:
      found.add((prefix + (m.group(1) or ""),
                 _PART.format(int(m.group(2))) if m.group(1) else MANIFEST))
  for part in _parts(directory):
    found.add((prefix if part == MANIFEST else f"{prefix}-h{part[len('manifest-h'):-5]}", part))
  return sorted(found)


def _parts(directory: Path) -> list[str]:
  """The manifest parts of `directory`: `manifest.json` (a single writer) and one per host."""
  return sorted(p.name for p in directory.glob("manifest*.json")
                if p.name == MANIFEST or re.fullmatch(r"manifest-h\d{5}\.json", p.name))


def _sidecar(shard: Path) -> Path:
  return shard.with_name(shard.name[:-len(_SUFFIX)] + _KEYS)


def _write_manifest(directory: Path, shards: list[dict], name: str = MANIFEST) -> None:
  with atomic_target(directory / name) as tmp:
    tmp.write_text(json.dumps({"format": _FORMAT, "version": _VERSION, "shards": shards}))


def _read_manifest(directory: Path) -> list[dict] | None:
  """The shards of every manifest part, in part order (None: the directory has no part)."""
  parts = _parts(directory)
  if not parts:
    return None
  return [e for part in parts for e in _read_part(directory / part)]


def _read_part(path: Path) -> list[dict]:
  try:
    manifest = json.loads(path.read_text())
    if manifest.get("format") != _FORMAT:
      raise ValueError(f"its format is {manifest.get('format')!r}, not {_FORMAT!r}")
    if manifest.get("version") != _VERSION:
      raise ValueError(f"version {manifest.get('version')!r}, this reader knows {_VERSION}; "
                       "re-run tokenize into it with --overwrite")
    return [dict(file=str(e["file"]), records=int(e["records"]), bytes=int(e["bytes"]),
                 keys_sha256=str(e["keys_sha256"])) for e in manifest["shards"]]
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ShardDirectoryError(f"{path}: not a code-shard manifest ({e})") from e


def _resumable_shards(directory: Path, prefix: str, manifest: str = MANIFEST) -> list[dict]:
  """One writer's complete shards (those its manifest part lists), after removing the shards an
  interrupted run renamed but did not list yet (numbered after every listed one, or all of them
  before its first listing); anything else of this writer unlisted is refused, and so is a
  directory of shards without any manifest (an older version's, or something else's)."""
  path = directory / manifest
  if not path.is_file():
    if not _parts(directory):
      found = sorted(p.name for p in directory.glob("*" + _SUFFIX)
                     if not _HOST_SHARD.search(p.name))  # a host's first, not listed yet
      if found:
        raise ShardDirectoryError(
            f"{directory} holds {len(found)} shard(s) ({found[0]}, ...) but no {MANIFEST}: "
            "written by an older version or by something else; pass --overwrite "
            "(overwrite=True) to clear it, or use another directory")
    for p in _own(directory, prefix, (_SUFFIX, _KEYS)):  # renamed before its first listing
      p.unlink()
    return []
  shards = _read_part(path)
  after = 1 + max((_index(e["file"], prefix) for e in shards), default=-1)
  listed = {e["file"] for e in shards}
  listed |= {_sidecar(Path(f)).name for f in listed}
  hint = "; pass --overwrite (overwrite=True) to start over"
  for path in _own(directory, prefix, (_SUFFIX, _KEYS)):
    if path.name not in listed:
      if _index(path.name, prefix) < after:
        raise ShardDirectoryError(f"{path} is not listed in {directory / manifest} (left by an "
                                  f"interrupted or another run){hint}")
      path.unlink()
  _check_shards(directory, shards, hint=hint, only=prefix)
  return shards


def _done_keys(directory: Path, shards: list[dict], earlier: set[str] = frozenset()) -> set[str]:
  """The keys of the complete `shards`, from their sidecars (each checked against the
  manifest's sha256 and record count, and to be disjoint from `earlier`); raises naming a
  missing or altered sidecar."""
  hint = "; pass --overwrite (overwrite=True) to start over"
  done: set[str] = set()
  for entry in shards:
    path = _sidecar(directory / entry["file"])
    try:
      data = path.read_bytes()
    except FileNotFoundError:
      raise ShardDirectoryError(f"{path} (the keys of the listed {entry['file']}) is "
                                f"missing{hint}") from None
    if hashlib.sha256(data).hexdigest() != entry["keys_sha256"]:
      raise ShardDirectoryError(f"{path}: its sha256 differs from {MANIFEST} (corrupted or "
                                f"rewritten){hint}")
    keys = json.loads(data)
    if len(keys) != entry["records"] or not done.isdisjoint(keys) or not earlier.isdisjoint(keys):
      raise ShardDirectoryError(f"{path}: {len(keys)} keys for {entry['records']} records, or "
                                f"keys already in an earlier shard{hint}")
    done.update(keys)
  return done


def _check_shards(directory: Path, shards: list[dict], hint: str = "",
                  only: str | None = None) -> list[str]:
  """The shard files of `directory`, in manifest order, after checking that they are exactly
  the manifest's shards (with `only`, those of the writer with that prefix), each with its size
  and record count."""
  listed = [e["file"] for e in shards]
  found = (directory.glob("*" + _SUFFIX) if only is None else _own(directory, only, (_SUFFIX,)))
  extra = sorted({p.name for p in found} - set(listed))
  if extra:
    raise ShardDirectoryError(f"{directory / extra[0]} is not listed in {directory / MANIFEST} "
                              f"({len(extra)} unlisted shard(s): left by an interrupted or "
                              f"another run){hint}")
  files = []
  for entry in shards:
    path = directory / entry["file"]
    if not path.is_file():
      raise ShardDirectoryError(f"{path} is listed in {MANIFEST} but missing{hint}")
    size = path.stat().st_size
    if size != entry["bytes"]:
      raise ShardDirectoryError(f"{path} has {size} bytes, {MANIFEST} says {entry['bytes']} "
                                f"(truncated or rewritten){hint}")
    count = _num_records(path, hint)
    if count != entry["records"]:
      raise ShardDirectoryError(f"{path} holds {count} records, {MANIFEST} says "
                                f"{entry['records']}{hint}")
    files.append(str(path))
  return files


def _num_records(path: Path, hint: str = "") -> int:
  """The record count of one shard; raises naming it if it is empty or unreadable."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if not path.stat().st_size:
    raise ShardDirectoryError(f"{path} is empty (0 bytes: a write that never finished){hint}")
  try:
    reader = array_record_module.ArrayRecordReader(str(path))
    count = reader.num_records()
    reader.close()
  except Exception as e:  # pylint: disable=broad-except  # the reader raises RuntimeError, ...
    raise ShardDirectoryError(f"{path} cannot be read as ArrayRecord ({e}){hint}") from e
  return count


def shard_files(path: str | os.PathLike) -> list[str]:
  """The ArrayRecord code shards of a directory (checked against its manifest), or of a glob
  pattern (each checked to be a readable, non-empty file), in record order."""
  path = str(path)
  if os.path.isdir(path):
    shards = _read_manifest(Path(path))
    if shards is None:
      found = glob.glob(os.path.join(path, "*" + _SUFFIX))
      if not found:
        raise FileNotFoundError(f"no .npz or *.array_record code shards at {path}")
      raise ShardDirectoryError(f"{path} has no {MANIFEST}: not a complete `tokenize` output "
                                "(interrupted before its first shard, or an older version); "
                                "re-run tokenize into it with --overwrite")
    return _check_shards(Path(path), shards)
  files = sorted(glob.glob(path))
  if not files:
    raise FileNotFoundError(f"no .npz or *.array_record code shards at {path}")
  for f in files:
    _num_records(Path(f))
  return files


def read(path: str | os.PathLike) -> Iterator[dict]:
  """Records {"key", "pixel", "semantic"} from a `.npz` or a directory/glob of ArrayRecord shards."""
  path = str(path)
  if path.endswith(".npz"):
    with np.load(path) as f:
      for key, pix, sem in zip(f["keys"], f["pixel"], f["semantic"]):
        yield {"key": str(key), "pixel": pix, "semantic": sem}
    return
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
  source = array_record_data_source.ArrayRecordDataSource(shard_files(path))
  for i in range(len(source)):
    yield serialization.msgpack_restore(source[i])
