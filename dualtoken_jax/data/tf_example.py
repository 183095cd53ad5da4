"""Reading serialized `tf.train.Example` protos without TensorFlow.

TFDS stores every dataset it prepares as ArrayRecord (or TFRecord) files of serialized
`tf.train.Example`s, with an image feature holding the encoded file. Parsing one needs only
the protobuf wire format of three messages, so this module does that directly and the
pipeline reads TFDS-prepared ArrayRecord files with no TensorFlow installed:

  Example  { Features features = 1; }
  Features { map<string, Feature> feature = 1; }   // map entry: key = 1, value = 2
  Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2;
                     Int64List int64_list = 3; } }
  BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1 [packed]; }
  Int64List { repeated int64 value = 1 [packed]; }
"""

from __future__ import annotations

import struct

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def parse_example(data: bytes) -> dict[str, list]:
  """Features of a serialized `tf.train.Example`: {name: list of bytes / float / int}.

  Raises:
    ValueError: the bytes are not a well-formed Example.
  """
  features: dict[str, list] = {}
  for field, _, features_msg in _fields(data):
    if field != 1:
      continue
    for entry_field, _, entry in _fields(features_msg):
      if entry_field != 1:
        continue
      name, value = None, []
      for f, _, payload in _fields(entry):
        if f == 1:
          name = bytes(payload).decode("utf-8")
        elif f == 2:
          value = _parse_feature(payload)
      if name is None:
        raise ValueError("feature map entry without a name")
      features[name] = value
  return features


def _parse_feature(data: memoryview) -> list:
  for field, _, payload in _fields(data):
    if field == 1:  # BytesList
      return [bytes(v) for f, _, v in _fields(payload) if f == 1]
    if field == 2:  # FloatList, packed or not
      out = []
      for f, w, v in _fields(payload):
        if f == 1:
          out.extend(struct.unpack(f"<{len(v) // 4}f", v) if w == _LEN else [v])
      return out
    if field == 3:  # Int64List, packed or not
      out = []
      for f, w, v in _fields(payload):
        if f == 1:
          out.extend(_signed(x) for x in (_varints(v) if w == _LEN else [v]))
      return out
  return []


def _fields(data):
  """Yields (field number, wire type, payload) over a message's top-level fields."""
  view = memoryview(data)
  pos, end = 0, len(view)
  while pos < end:
    tag, pos = _read_varint(view, pos)
    field, wire = tag >> 3, tag & 7
    if wire == _VARINT:
      value, pos = _read_varint(view, pos)
    elif wire == _I64:
      value, pos = struct.unpack_from("<d", view, pos)[0], pos + 8
    elif wire == _I32:
      value, pos = struct.unpack_from("<f", view, pos)[0], pos + 4
    elif wire == _LEN:
      size, pos = _read_varint(view, pos)
      if pos + size > end:
        raise ValueError("length-delimited field runs past the end of the message")
      value, pos = view[pos:pos + size], pos + size
    else:
      raise ValueError(f"unsupported wire type {wire}")
    if pos > end:
      raise ValueError("truncated message")
    yield field, wire, value


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
  result, shift = 0, 0
  while True:
    if pos >= len(view):
      raise ValueError("truncated varint")
    byte = view[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise ValueError("varint longer than 10 bytes")


def _varints(view: memoryview):
  pos = 0
  while pos < len(view):
    value, pos = _read_varint(view, pos)
    yield value


def _signed(value: int) -> int:
  return value - (1 << 64) if value >= 1 << 63 else value
