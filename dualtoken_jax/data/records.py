"""The record schema shared by every source and stage, and the reasons a record is skipped.

A source record is a dict with a string `key` and the image as either `image_bytes` (an encoded
file: JPEG, PNG, WebP, ...) or `image` (an already decoded uint8 array, as `tfds.data_source`
returns). Sources may add a `caption` string (webdataset shards), which tokenizer training
ignores.

A record that cannot become a training example is not an exception: it is replaced by a *skip
record* `{"key", "skip": reason, "error": message}` that flows through the pipeline like any other
record and is counted by reason when batches are formed. One corrupt JPEG in ten million must
not stop a TPU pod, but a dataset where most records fail must be visible in the logs and
metrics, hence counters instead of silent filtering.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

class SkipReasons:
  """The reasons a stream's records may be skipped; their order is the layout of its count
  vectors (int32, one entry per reason) and of its `{reason: count}` totals.

  The image pipelines use `IMAGE_SKIPS`; a stage with more ways to fail registers its own
  reasons on top (`IMAGE_SKIPS.extend(...)`, as the MLLM's conversation data does), so image
  failures are counted under the same names everywhere.
  """

  def __init__(self, names: Sequence[str]):
    names = tuple(names)
    if len(set(names)) != len(names) or not all(n.isidentifier() for n in names):
      raise ValueError(f"skip reasons must be distinct identifiers (metric names), got {names}")
    self.names = names
    self._index = {reason: i for i, reason in enumerate(names)}

  def extend(self, *names: str) -> SkipReasons:
    return SkipReasons(self.names + names)

  def index(self, reason: str) -> int:
    if reason not in self._index:
      raise ValueError(f"unknown skip reason {reason!r}; expected one of {self.names}")
    return self._index[reason]

  def record(self, reason: str, key: str, error: str = "") -> dict[str, Any]:
    """A record standing in for one that was dropped because of `reason`."""
    self.index(reason)
    return {"key": key, "skip": reason, "error": error}

  def zeros(self) -> np.ndarray:
    """An all-zero count vector."""
    return np.zeros(len(self.names), np.int32)

  def one_hot(self, reason: str) -> np.ndarray:
    """A count vector with a single 1 at `reason`."""
    counts = self.zeros()
    counts[self.index(reason)] = 1
    return counts

  def to_dict(self, counts) -> dict[str, int]:
    """{reason: count} from a count vector (or a stack of them, summed over leading axes)."""
    counts = np.asarray(counts).reshape(-1, len(self.names)).sum(axis=0)
    return {reason: int(c) for reason, c in zip(self.names, counts)}

  def __repr__(self) -> str:
    return f"SkipReasons({self.names})"


# Why an image record was skipped.
IMAGE_SKIPS = SkipReasons((
    "missing",       # the file vanished between indexing and reading
    "read_error",    # any other I/O failure (permissions, truncated tar member, ...)
    "empty",         # zero-byte payload
    "decode_error",  # PIL could not decode it (corrupt, truncated, not an image, odd mode)
    "too_large",     # more pixels than the decode limit (decompression-bomb guard), or more
                     # bytes than the read limit (`decode.DEFAULT_MAX_BYTES`)
    "bad_member",    # tar member with an absolute path, a `..` component, or not a regular file
    "not_a_file",    # a path that is a FIFO, device, socket or directory (never opened to read)
))
SKIP_REASONS = IMAGE_SKIPS.names


def skip_record(reason: str, key: str, error: str = "") -> dict[str, Any]:
  """An image record standing in for one that was dropped because of `reason`."""
  return IMAGE_SKIPS.record(reason, key, error)


def is_skipped(record: Mapping[str, Any]) -> bool:
  return "skip" in record


def read_failure(key: str, exc: OSError) -> dict[str, Any]:
  """The skip record for an I/O error while reading `key`."""
  reason = "missing" if isinstance(exc, FileNotFoundError) else "read_error"
  return skip_record(reason, key, f"{type(exc).__name__}: {exc}")
