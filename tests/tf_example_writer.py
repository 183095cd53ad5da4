"""Writing serialized `tf.train.Example` protos without TensorFlow, for test data (the
library only reads them: `dualtoken_jax.data.tf_example`)."""

from __future__ import annotations

import struct
from typing import Mapping, Sequence

import numpy as np

_LEN = 2  # the wire type of length-delimited fields


def encode_example(features: Mapping[str, bytes | str | int | float | Sequence]) -> bytes:
  """Serializes {name: value(s)} as a `tf.train.Example` (bytes/str, int or float lists)."""
  entries = b""
  for name, values in sorted(features.items()):
    if isinstance(values, (bytes, str, int, float, np.generic)):
      values = [values]
    values = list(values)
    if all(isinstance(v, (bytes, str)) for v in values):
      body = b"".join(_len_field(1, v.encode() if isinstance(v, str) else v) for v in values)
      feature = _len_field(1, body)
    elif all(isinstance(v, (int, np.integer)) for v in values):
      packed = b"".join(_varint(int(v) & 0xFFFFFFFFFFFFFFFF) for v in values)
      feature = _len_field(3, _len_field(1, packed))
    elif all(isinstance(v, (float, int, np.floating, np.integer)) for v in values):
      feature = _len_field(2, _len_field(1, struct.pack(f"<{len(values)}f", *values)))
    else:
      raise TypeError(f"feature {name!r}: values must all be bytes/str, ints or floats")
    entries += _len_field(1, _len_field(1, name.encode()) + _len_field(2, feature))
  return _len_field(1, entries)


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | _LEN) + _varint(len(payload)) + payload
