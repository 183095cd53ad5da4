"""Concatenating host-local results over JAX processes (identity on a single process).

Every process must call these in the same order (they are collectives). JAX runs without
x64 here, so values travel as 8/16/32-bit types: strings as fixed-width UTF-8 bytes, floats
as float32.
"""

from __future__ import annotations

import jax
import numpy as np


def _allgather(x: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def concat(x: np.ndarray) -> np.ndarray:
  """Every process's rows of `x` (numbers), concatenated in process order."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  if x.dtype.kind == "f":
    x = x.astype(np.float32)
  elif x.dtype.kind in "iu" and x.dtype.itemsize > 4:
    x = x.astype(np.int32)
  counts = _allgather(np.array([len(x)], np.int32))[:, 0]
  padded = np.zeros((int(counts.max()),) + x.shape[1:], x.dtype)
  padded[:len(x)] = x
  every = _allgather(padded)
  return np.concatenate([every[p, :c] for p, c in enumerate(counts)])


def concat_strings(values) -> np.ndarray:
  """Every process's strings, concatenated in process order (a numpy str array)."""
  values = np.asarray(values, dtype=str)
  if jax.process_count() == 1:
    return values
  encoded = [s.encode("utf-8") for s in values.tolist()]
  width = int(_allgather(np.array([max(map(len, encoded), default=1)], np.int32)).max())
  raw = np.zeros((len(encoded), width), np.uint8)
  for i, b in enumerate(encoded):
    raw[i, :len(b)] = np.frombuffer(b, np.uint8)
  rows = concat(raw)
  return np.array([bytes(r).rstrip(b"\0").decode("utf-8") for r in rows], dtype=str)
