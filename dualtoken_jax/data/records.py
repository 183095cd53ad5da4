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

from typing import Any, Mapping

import numpy as np

# Why a record was skipped. The order is the layout of the per-record count vectors.
SKIP_REASONS = (
    "missing",       # the file vanished between indexing and reading
    "read_error",    # any other I/O failure (permissions, truncated tar member, ...)
    "empty",         # zero-byte payload
    "decode_error",  # PIL could not decode it (corrupt, truncated, not an image, odd mode)
    "too_large",     # more pixels than the decode limit (decompression-bomb guard)
    "bad_member",    # tar member with an absolute path, a `..` component, or not a regular file
)
_REASON_INDEX = {reason: i for i, reason in enumerate(SKIP_REASONS)}


def skip_record(reason: str, key: str, error: str = "") -> dict[str, Any]:
  """A record standing in for one that was dropped because of `reason`."""
  if reason not in _REASON_INDEX:
    raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
  return {"key": key, "skip": reason, "error": error}


def is_skipped(record: Mapping[str, Any]) -> bool:
  return "skip" in record


def read_failure(key: str, exc: OSError) -> dict[str, Any]:
  """The skip record for an I/O error while reading `key`."""
  reason = "missing" if isinstance(exc, FileNotFoundError) else "read_error"
  return skip_record(reason, key, f"{type(exc).__name__}: {exc}")


def zero_counts() -> np.ndarray:
  """An int32 count vector over SKIP_REASONS, all zeros."""
  return np.zeros(len(SKIP_REASONS), np.int32)


def one_hot_count(reason: str) -> np.ndarray:
  """A count vector with a single 1 at `reason`."""
  counts = zero_counts()
  counts[_REASON_INDEX[reason]] = 1
  return counts


def counts_to_dict(counts: np.ndarray) -> dict[str, int]:
  """{reason: count} from a count vector (or a stack of them, summed over leading axes)."""
  counts = np.asarray(counts).reshape(-1, len(SKIP_REASONS)).sum(axis=0)
  return {reason: int(c) for reason, c in zip(SKIP_REASONS, counts)}


def reason_index(reason: str) -> int:
  return _REASON_INDEX[reason]
