"""Grain input pipelines: a sharded, shuffled, repeated train stream and an exact eval pass.

Train (`make_train_dataset`):

  source -> global shuffle(seed, reshuffled every epoch) -> repeat(num_epochs)
    -> decode -> RandomResizedCrop (per-record RNG from seed and stream position)
    -> this host's slice [shard_index::shard_count] -> drop + count skipped records
    -> batch(per-host batch) -> [worker processes] -> [batch prefetch thread] -> totals

Every host builds the same shuffled stream (same `seed` everywhere!) and keeps every
`shard_count`-th element, so hosts see disjoint shares that together cover each epoch, and
each host reads only its own records. Records are fetched lazily: no host decodes anything it
does not train on. The iterator is a `grain.DatasetIterator`: `get_state()` / `set_state()`
(JSON-serialisable dicts) resume exactly where the state was taken, and it can be saved with
Orbax through `grain.checkpoint.CheckpointSave` / `CheckpointRestore`.

Eval (`make_eval_dataset`): no shuffle, no repeat; the host's share is padded so that every
host yields the same number of full batches (multi-host steps stay in lock-step), and a `mask`
marks real images: each image of the source is evaluated exactly once across hosts.

Bad records (see `records.SKIP_REASONS`) never raise. Training drops them and refills the
batch; eval keeps their slot with `mask=False`. Every batch carries `skipped`, the
{reason: count} of records dropped while it was formed, and the iterator keeps cumulative
totals (`iterator.skipped_total`, also in its checkpoint state). A bad record is counted
every time the stream reaches it (once per epoch), including in the dropped remainder of a
finite stream.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from typing import Any

from absl import flags
import grain
import numpy as np

from dualtoken_jax.data import decode
from dualtoken_jax.data import records
from dualtoken_jax.data import transforms

# One failure in a million is noise; a thousand in a row means the source is misconfigured
# (wrong image_key, unmounted bucket, ...) and training would spin forever without a batch.
DEFAULT_MAX_CONSECUTIVE_SKIPS = 1000


def make_train_dataset(source: Any, *, batch_size: int, resolution: int, seed: int,
                       num_epochs: int | None = None, shard_index: int | None = None,
                       shard_count: int | None = None, scale=transforms.TRAIN_SCALE,
                       ratio=transforms.TRAIN_RATIO, num_threads: int = 0,
                       prefetch_buffer_size: int | None = None, num_workers: int = 0,
                       prefetch_batches: int = 0,
                       max_pixels: int = decode.DEFAULT_MAX_PIXELS, alpha: str = "white",
                       max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS
                       ) -> grain.IterDataset:
  """The training stream of one host: batches `{"image": f32[B, res, res, 3], "skipped"}`.

  Args:
    source: a random-access source of records (`records.py`), e.g. `WebDatasetSource`.
    batch_size: examples per batch on this host (global batch / process count; see
      `global_batch.host_batch_size`). Incomplete batches are dropped.
    resolution: output side length (384 or 256 for the paper's configs).
    seed: shuffle and augmentation seed. Must be the same on every host: hosts partition one
      shared shuffled order.
    num_epochs: passes over the source; None repeats forever.
    shard_index, shard_count: this host's share; default `jax.process_index()` /
      `jax.process_count()`.
    scale, ratio: RandomResizedCrop ranges (spec A.2: (0.9, 1.0) and (3/4, 4/3)).
    num_threads: threads reading and decoding records in each process; 0 = inline.
    prefetch_buffer_size: records read ahead by those threads (default 2 batches).
    num_workers: worker processes each producing whole batches (grain `mp_prefetch`);
      0 = everything in this process. Changing it changes the batch order.
    prefetch_batches: batches prepared ahead by a background thread; 0 = none.
    max_pixels, alpha: decoding options (`decode.decode_image`).
    max_consecutive_skips: raise after this many skipped records in a row.

  Returns:
    A `grain.IterDataset`; `iter()` of it is a checkpointable `SkipCountingIterator`.
  """
  _check_positive("batch_size", batch_size)
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  if num_epochs is not None:
    _check_positive("num_epochs", num_epochs)
  shuffle_seed, crop_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))

  ds = grain.MapDataset.source(_GuardedSource(source))
  # Shuffle before repeat: grain folds the epoch into the seed, so every epoch is a new
  # permutation of the whole source and epochs never mix.
  ds = ds.shuffle(seed=shuffle_seed).repeat(num_epochs)
  ds = ds.map(decode.DecodeImage(max_pixels=max_pixels, alpha=alpha))
  # Before slicing, so a record's crop depends on its global stream position, not on the
  # number of hosts.
  ds = ds.random_map(transforms.TrainPreprocess(resolution, scale=scale, ratio=ratio),
                     seed=crop_seed)
  ds = HostBlocks(ds, shard_index, shard_count, batch_size)
  ds = ds.to_iter_dataset(_read_options(num_threads, prefetch_buffer_size, batch_size))
  ds = DropSkipped(ds, records.IMAGE_SKIPS, max_consecutive_skips=max_consecutive_skips,
                   blank={"image": np.zeros((resolution, resolution, 3), np.float32),
                          "key": ""})
  # Short batches are dropped by CountSkips, after their skip counts are taken.
  ds = ds.batch(batch_size, drop_remainder=False)
  ds = parallelize(ds, num_workers, prefetch_batches)
  return CountSkips(ds, records.IMAGE_SKIPS, batch_size=batch_size, drop_remainder=True)


def make_eval_dataset(source: Any, *, batch_size: int, resolution: int,
                      shard_index: int | None = None, shard_count: int | None = None,
                      num_threads: int = 0, prefetch_buffer_size: int | None = None,
                      num_workers: int = 0, prefetch_batches: int = 0,
                      max_pixels: int = decode.DEFAULT_MAX_PIXELS,
                      alpha: str = "white") -> grain.IterDataset:
  """One pass over this host's share: `{"image", "mask": bool[B], "key": str[B], "skipped"}`.

  Host `shard_index` takes records shard_index, shard_index + shard_count, ... in source
  order, resized (shorter side) and centre-cropped to `resolution`, padded to
  `eval_num_batches(len(source), batch_size, shard_count)` full batches. Padding rows and
  records that failed to load have `mask=False` and a zero image; the failures are counted
  in `skipped`. Arguments are as in `make_train_dataset`.
  """
  _check_positive("batch_size", batch_size)
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  num_batches = eval_num_batches(len(source), batch_size, shard_count)

  ds = grain.MapDataset.source(_GuardedSource(source))[shard_index::shard_count]
  ds = ds.map(decode.DecodeImage(max_pixels=max_pixels, alpha=alpha))
  ds = ds.map(transforms.EvalPreprocess(resolution))
  ds = ds.map(_EvalExample(resolution))
  padding = num_batches * batch_size - len(ds)
  if padding:
    pad = grain.MapDataset.range(padding).map(_EvalPadding(resolution))
    ds = grain.MapDataset.concatenate([ds, pad])
  # Batched before `to_iter_dataset` so worker processes split whole batches and every
  # batch is full; threads then work on several batches at once.
  ds = ds.batch(batch_size)
  ds = ds.to_iter_dataset(_read_options(num_threads, prefetch_buffer_size, 1))
  ds = parallelize(ds, num_workers, prefetch_batches)
  return CountSkips(ds, records.IMAGE_SKIPS, batch_size=batch_size, drop_remainder=False)


class HostBlocks(grain.MapDataset):
  """One host's share of a record stream read by `count` hosts in turns of `block` records:
  host `index` takes records k·count·block + index·block + j (j < block) for k = 0, 1, ... So
  global batch k (count·block records) is the hosts' blocks in process order, which is where
  `make_array_from_process_local_data` puts them: the same records in the same rows as one
  host reading the whole batch, for any number of hosts (training on 2 hosts × 4 devices
  computes what 1 × 8 does). Every record of the stream is read by exactly one host."""

  def __init__(self, parent: grain.MapDataset, index: int, count: int, block: int):
    super().__init__(parent)
    self._index, self._count, self._block = index, count, block
    self._length = len(parent) // (count * block) * block

  def __len__(self) -> int:
    return self._length

  def parent_index(self, index: int) -> int:
    """The stream position of this host's `index`-th record."""
    turn, j = divmod(index, self._block)
    return (turn * self._count + self._index) * self._block + j

  def __getitem__(self, index):
    if isinstance(index, slice):
      raise TypeError("HostBlocks does not slice; slice the stream before sharding it")
    return self._parent[self.parent_index(index)]

  def __str__(self) -> str:
    return f"HostBlocks(index={self._index}, count={self._count}, block={self._block})"


def eval_num_batches(num_records: int, batch_size: int, shard_count: int) -> int:
  """Batches every host yields in an eval pass (the largest host share, rounded up)."""
  return math.ceil(math.ceil(num_records / shard_count) / batch_size)


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """(index, count) of this host's data share, defaulting to JAX's process index/count."""
  if shard_index is None or shard_count is None:
    import jax  # Deferred: process_index() initialises the backends (and grabs the TPU).
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), "
                     f"got {shard_index}")
  return int(shard_index), int(shard_count)


class SkipCountingIterator(grain.DatasetIterator):
  """A pipeline's outermost iterator: per-batch skip counts, cumulative totals in state.

  The parent yields batches whose `skipped` holds count vectors over `reasons` (one per row,
  from `DropSkipped` or per-record counts); each batch comes out with `skipped` as their
  {reason: count} sum. With `drop_remainder`, batches with fewer than `batch_size` valid rows
  (a finite stream's end) are dropped after their counts are taken.

  State: `{"parent": <grain state>, "skipped_total": {reason: int}}`.
  """

  def __init__(self, parent: grain.DatasetIterator, reasons: records.SkipReasons, *,
               batch_size: int, drop_remainder: bool):
    super().__init__(parent)
    self._reasons = reasons
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    self._totals = dict.fromkeys(reasons.names, 0)

  @property
  def skipped_total(self) -> dict[str, int]:
    """{reason: records skipped so far by this host's pipeline}, including before a resume."""
    return dict(self._totals)

  def __next__(self) -> dict[str, Any]:
    while True:
      batch = dict(next(self._parent))
      skipped = self._reasons.to_dict(batch.pop("skipped"))
      for reason, count in skipped.items():
        self._totals[reason] += count
      valid = batch.pop("valid", None)  # From DropSkipped: False just for a stream's tail.
      num_valid = len(batch["image"]) if valid is None else int(np.sum(valid))
      if self._drop_remainder and num_valid < self._batch_size:
        continue  # The end of a finite stream (one per worker process).
      batch["skipped"] = skipped
      return batch

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "skipped_total": dict(self._totals)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._totals = {r: int(state["skipped_total"].get(r, 0)) for r in self._reasons.names}

  def set_state_from_hosts(self, states: list[dict[str, Any]], shard_index: int,
                           shard_count: int) -> None:
    """Resumes a stream saved by `len(states)` hosts (state of host i at i) on this host, one
    of `shard_count`, the global batch unchanged (`HostBlocks` streams).

    Every old host stood at some turn of the shared stream (turn = global batches begun); the
    stream restarts for every new host at the latest such turn: exactly where the run stopped
    when no record was skipped (all hosts then stand at the same turn), else after at most the
    rest of the turns the lagging hosts had not finished (those records are not re-read, and
    none is read twice). Skip totals are carried by the new host 0. Only the pipeline's
    in-process form (`num_workers=0`, no batch prefetch) has a position that can be mapped."""
    try:
      indices = [int(st["parent"]["next_index"]) for st in states]
    except (KeyError, TypeError):
      raise ValueError(
          "the data position of a run saved by a different number of processes can only be "
          "carried over for the in-process pipeline (config.data.num_workers=0, no batch "
          "prefetch); resume with the original process count") from None
    global_batch = self._batch_size * shard_count
    if global_batch % len(states):
      raise ValueError(f"global batch {global_batch} does not split over the {len(states)} "
                       "processes that saved the run")
    old_block = global_batch // len(states)
    turn = max(-(-i // old_block) for i in indices)
    self._parent.set_state({"next_index": turn * self._batch_size})
    self._totals = {r: sum(int(st["skipped_total"].get(r, 0)) for st in states)
                    if shard_index == 0 else 0 for r in self._reasons.names}


class CountSkips(grain.IterDataset):
  """Batches -> `SkipCountingIterator` (see there)."""

  def __init__(self, parent: grain.IterDataset, reasons: records.SkipReasons, *,
               batch_size: int, drop_remainder: bool):
    super().__init__(parent)
    self._reasons = reasons
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder

  def __iter__(self) -> SkipCountingIterator:
    return SkipCountingIterator(self._parent.__iter__(), self._reasons,
                                batch_size=self._batch_size, drop_remainder=self._drop_remainder)


class _DropSkippedIterator(grain.DatasetIterator):
  """Yields kept elements + `skipped` (counts of the records dropped before it) + `valid`.

  With a `blank` element, kept elements are cut to its fields, and when a finite stream ends
  with dropped records one last element, `blank` with `valid=False`, carries their counts
  (its batch is then short, and dropped by `CountSkips`).
  """

  def __init__(self, parent: grain.DatasetIterator, reasons: records.SkipReasons,
               blank: dict[str, Any] | None, max_consecutive_skips: int):
    super().__init__(parent)
    self._reasons = reasons
    self._blank = blank
    self._max_consecutive_skips = max_consecutive_skips

  def __next__(self) -> dict[str, Any]:
    counts = self._reasons.zeros()
    while True:
      try:
        element = next(self._parent)
      except StopIteration:
        if counts.any() and self._blank is not None:
          return {**self._blank, "skipped": counts, "valid": np.bool_(False)}
        raise
      if not records.is_skipped(element):
        if self._blank is not None:
          element = {k: element[k] for k in self._blank}
        return {**element, "skipped": counts, "valid": np.bool_(True)}
      counts[self._reasons.index(element["skip"])] += 1
      _log_skip(element)
      if counts.sum() >= self._max_consecutive_skips:
        raise RuntimeError(
            f"{counts.sum()} records in a row could not be used "
            f"({self._reasons.to_dict(counts)}); last: {element['key']!r}: "
            f"{element['error']}. Check the data source (paths, image_key, image_root, "
            "pre-computed codes, permissions).")

  # Skip counts only live between two returned elements, so the parent's state suffices.
  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class DropSkipped(grain.IterDataset):
  """Drops skip records (`records.is_skipped`); the next kept element counts them.

  Args:
    parent: elements and skip records with a reason from `reasons`.
    reasons: the stream's skip reasons, the layout of the `skipped` count vectors.
    max_consecutive_skips: raise after this many skipped records in a row.
    blank: the fields to keep, with the values of a padding element (see
      `_DropSkippedIterator`); None keeps every field (the stream then has to be endless, or
      the counts of skips at its very end are lost).
  """

  def __init__(self, parent: grain.IterDataset, reasons: records.SkipReasons, *,
               max_consecutive_skips: int, blank: dict[str, Any] | None = None):
    super().__init__(parent)
    _check_positive("max_consecutive_skips", max_consecutive_skips)
    self._reasons = reasons
    self._blank = blank
    self._max_consecutive_skips = max_consecutive_skips

  def __iter__(self) -> _DropSkippedIterator:
    return _DropSkippedIterator(self._parent.__iter__(), self._reasons, self._blank,
                                self._max_consecutive_skips)


class _EvalExample(grain.transforms.Map):
  """Preprocessed record or skip record -> the fixed eval element layout."""

  def __init__(self, resolution: int):
    self._shape = (resolution, resolution, 3)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    if records.is_skipped(element):
      _log_skip(element)
      return {"image": np.zeros(self._shape, np.float32), "mask": np.bool_(False),
              "key": element["key"], "skipped": records.IMAGE_SKIPS.one_hot(element["skip"])}
    return {"image": element["image"], "mask": np.bool_(True), "key": element["key"],
            "skipped": records.IMAGE_SKIPS.zeros()}


class _EvalPadding(grain.transforms.Map):

  def __init__(self, resolution: int):
    self._shape = (resolution, resolution, 3)

  def map(self, element: int) -> dict[str, Any]:
    del element
    return {"image": np.zeros(self._shape, np.float32), "mask": np.bool_(False), "key": "",
            "skipped": records.IMAGE_SKIPS.zeros()}


class _GuardedSource:
  """A third-party source whose I/O errors become skip records (ours already do this)."""

  def __init__(self, source: Any):
    if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
      raise TypeError(f"source must support len() and [index] (grain's random-access "
                      f"protocol), got {type(source).__name__}")
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      return self._source[index]
    except OSError as e:
      return records.read_failure(f"{type(self._source).__name__}/{index}", e)

  def __repr__(self) -> str:
    return repr(self._source)


def parallelize(ds: grain.IterDataset, num_workers: int,
                prefetch_batches: int) -> grain.IterDataset:
  """`num_workers` processes producing elements of `ds` (grain `mp_prefetch`; 0 = none), then
  `prefetch_batches` elements prepared ahead by a thread (0 = none)."""
  if num_workers < 0 or prefetch_batches < 0:
    raise ValueError(f"num_workers and prefetch_batches must be >= 0, got {num_workers}, "
                     f"{prefetch_batches}")
  if num_workers:
    # grain 0.2.18 reads an absl flag when starting workers and fails in programs that do not
    # parse flags (scripts, notebooks, pytest); google/grain#1355, fixed upstream later.
    # Marking them parsed keeps every flag at its default.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  if prefetch_batches:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
  return ds


def _read_options(num_threads: int, prefetch_buffer_size: int | None,
                  batch_size: int) -> grain.ReadOptions:
  if num_threads < 0:
    raise ValueError(f"num_threads must be >= 0, got {num_threads}")
  if prefetch_buffer_size is None:
    prefetch_buffer_size = max(2 * batch_size, num_threads) if num_threads else 0
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)


def _check_positive(name: str, value: int) -> None:
  if not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


_skip_log_counts: collections.Counter = collections.Counter()
_skip_log_lock = threading.Lock()


def _log_skip(element: dict[str, Any]) -> None:
  """Logs the first skip of each reason in full, then every 1000th as a running count."""
  reason = element["skip"]
  with _skip_log_lock:
    _skip_log_counts[reason] += 1
    n = _skip_log_counts[reason]
  if n == 1:
    logging.warning("skipping record %r (%s): %s", element["key"], reason, element["error"])
  elif n % 1000 == 0:
    logging.warning("%d records skipped for %s in this process so far", n, reason)
