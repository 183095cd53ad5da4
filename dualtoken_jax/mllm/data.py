"""Conversation data for the MLLM: LLaVA JSON/JSONL sources, images or pre-computed codes,
a grain training stream and a fixed evaluation set. Bad samples are skipped and counted.

Train stream (per host, like `data.make_train_dataset`):

  ConversationSource [+ CaptionSource, mixed by weight] -> shuffle(seed, every epoch) -> repeat
    -> PrepareExample
    -> this host's slice [i::n] -> drop + count skip records -> batch -> totals

`PrepareExample` reads and decodes the image (shorter side -> image_size, centre crop, [-1, 1])
or looks its codes up in a `CodeTable`, and builds the token arrays (`sequence.build_example`).
Anything wrong with a sample (unreadable or undecodable image, missing codes, malformed
conversation, too long) turns it into a skip record with a reason from `sequence.SKIPS`; batches
carry the counts and the iterator keeps per-reason totals in its (checkpointed) state.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import numpy as np
from flax import serialization

from dualtoken_jax.data import code_shards
from dualtoken_jax.models import config as model_config
from dualtoken_jax.data import decode, records, transforms
from dualtoken_jax.data import pipeline
from dualtoken_jax.data.pipeline import resolve_shard
from dualtoken_jax.mllm import caption_data
from dualtoken_jax.mllm import sequence

ARRAY_KEYS = ("tokens", "image_mask", "input_mask", "loss_mask", "mask_ar", "gen_mask",
              "has_image")
IMAGE_KEYS = ("image",)
CODE_KEYS = ("codes_pixel", "codes_semantic")
_skip = sequence.SKIPS.record  # a skip record with an MLLM reason


# ---------------------------------------------------------------- sources
class ConversationSource:
  """LLaVA conversation records, random access: a JSON list (parsed once, kept as compact
  bytes) or JSONL (indexed by line offsets, read lazily). Records: {"key", "image" (resolved
  path or None), "conversations"}; an unparsable JSONL line becomes a skip record."""

  def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike = ""):
    self._path = os.fspath(path)
    self._root = os.fspath(image_root)
    if not os.path.isfile(self._path):
      raise FileNotFoundError(f"conversation file not found: {self._path}")
    with open(self._path, "rb") as f:
      head = f.read(4096).lstrip()
    self._items: list[bytes] | None = None
    self._offsets: np.ndarray | None = None
    if head.startswith(b"["):
      try:
        with open(self._path, encoding="utf-8") as f:
          data = json.load(f)
      except json.JSONDecodeError as e:  # one unreadable list: nothing to skip, name the spot
        raise ValueError(f"{self._path}: invalid JSON at line {e.lineno}, column {e.colno}: "
                         f"{e.msg} (a LLaVA JSON list; or use JSONL, one record per line, "
                         "where a bad line is skipped and counted)") from e
      except UnicodeDecodeError as e:
        raise ValueError(f"{self._path}: not UTF-8 text (byte {e.start}): {e.reason}") from e
      self._items = [json.dumps(item).encode() for item in data]
    else:
      offsets, pos = [], 0
      with open(self._path, "rb") as f:
        for line in f:
          if line.strip():
            offsets.append(pos)
          pos += len(line)
      self._offsets = np.asarray(offsets, np.int64)
    if len(self) == 0:
      raise ValueError(f"{self._path} holds no conversations")

  def __len__(self) -> int:
    return len(self._items) if self._items is not None else len(self._offsets)

  def _raw(self, index: int) -> bytes:
    if self._items is not None:
      return self._items[index]
    with open(self._path, "rb") as f:
      f.seek(int(self._offsets[index]))
      return f.readline()

  def __getitem__(self, index: int) -> dict[str, Any]:
    key = f"{os.path.basename(self._path)}/{index}"
    try:
      item = json.loads(self._raw(index))
    except OSError as e:
      return records.read_failure(key, e)
    except ValueError as e:
      return _skip("bad_conversation", key, f"unparsable record: {e}")
    if not isinstance(item, dict):
      return _skip("bad_conversation", key, f"record is a {type(item).__name__}, not an object")
    key = str(item.get("id", key))
    image = item.get("image")
    if image is not None and not isinstance(image, str):
      return _skip("bad_conversation", key, "'image' must be one path (multi-image samples "
                                            "are not supported)")
    if image and self._root and not os.path.isabs(image):
      image = os.path.join(self._root, image)
    return {"key": key, "image": image or None, "conversations": item.get("conversations")}

  def __repr__(self) -> str:
    return f"ConversationSource({self._path!r}, image_root={self._root!r})"


class CodeTable:
  """Pre-computed codes by image key (`python -m dualtoken_jax.tokenize` output): a `.npz`
  (held in memory) or ArrayRecord shards (an in-memory key index, records read on demand).
  Keys match after `os.path.normpath`; a conversation's image path is looked up as resolved
  against the image root, then as written."""

  def __init__(self, path: str | os.PathLike):
    self._path = os.fspath(path)
    self._arrays = None
    self._source = None
    if self._path.endswith(".npz"):
      with np.load(self._path) as f:
        self._arrays = (f["pixel"].astype(np.int32), f["semantic"].astype(np.int32))
        keys = [str(k) for k in f["keys"]]
    else:
      from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
      self._source = array_record_data_source.ArrayRecordDataSource(
          code_shards.shard_files(self._path))  # checked against the directory's manifest
      keys = [r["key"] for r in code_shards.read(self._path)]
    self._index = {os.path.normpath(k): i for i, k in enumerate(keys)}

  def __len__(self) -> int:
    return len(self._index)

  def lookup(self, *candidates: str) -> tuple[np.ndarray, np.ndarray] | None:
    for key in candidates:
      i = self._index.get(os.path.normpath(key)) if key else None
      if i is None:
        continue
      if self._arrays is not None:
        return self._arrays[0][i], self._arrays[1][i]
      record = serialization.msgpack_restore(self._source[i])
      return np.asarray(record["pixel"], np.int32), np.asarray(record["semantic"], np.int32)
    return None


# ---------------------------------------------------------------- one sample
class PrepareExample(grain.transforms.Map):
  """Conversation or caption record -> example (token arrays + image or codes), or a skip
  record. Caption records (`caption_data.CaptionSource`) become generation examples."""

  def __init__(self, vocab: sequence.Vocabulary, layout: sequence.Layout, tokenizer_config,
               codes: CodeTable | None = None, image_root: str = ""):
    self._vocab, self._layout, self._codes, self._root = vocab, layout, codes, image_root
    self._size = int(tokenizer_config.image_size)
    g = model_config.grid_size(tokenizer_config)
    self._code_shapes = ((g, g, tokenizer_config.vq_pix.depth),
                         (g, g, tokenizer_config.vq_sem.depth))
    self._codebook_sizes = (tokenizer_config.vq_pix.codebook_size,
                            tokenizer_config.vq_sem.codebook_size)

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    if records.is_skipped(record):
      return record
    key, path = record["key"], record.get("image")
    try:
      if "caption" in record:
        example = sequence.build_generation_example(self._vocab, self._layout, record["caption"])
      else:
        example = sequence.build_example(self._vocab, self._layout, record["conversations"],
                                         has_image=path is not None)
    except sequence.SkipExample as e:
      return _skip(e.reason, key, str(e))
    has_image = path is not None or "image_bytes" in record
    example["has_image"] = np.bool_(has_image)
    if self._codes is not None:
      pix, sem = (np.zeros(s, np.int32) for s in self._code_shapes)
      if has_image:
        found = self._codes.lookup(
            path or key, os.path.relpath(path, self._root) if self._root and path else "")
        if found is None:
          return _skip("missing_codes", key, f"no pre-computed codes for image {path!r}")
        pix, sem = found
      if (pix.shape, sem.shape) != self._code_shapes:
        return _skip("bad_codes", key, f"codes of {path!r} have shapes {pix.shape}, "
                                       f"{sem.shape}; the config expects {self._code_shapes}")
      if any(c.min() < 0 or c.max() >= k for c, k in zip((pix, sem), self._codebook_sizes)):
        return _skip("bad_codes", key, f"codes of {path!r} lie outside the codebooks "
                                       f"(sizes {self._codebook_sizes}): another tokenizer?")
      example["codes_pixel"], example["codes_semantic"] = pix, sem
      return example
    image = np.zeros((self._size, self._size, 3), np.float32)
    if has_image:
      try:
        data = record.get("image_bytes")
        if data is None:
          data = decode.read_image_file(path)
        pil = decode.decode_image(data)
      except OSError as e:
        return records.read_failure(key, e)
      except decode.SkipImage as e:
        return records.skip_record(e.reason, key, str(e))
      image = transforms.to_float(transforms.resize_center_crop(pil, self._size))
    example["image"] = image
    return example


# ---------------------------------------------------------------- the training stream
def make_train_dataset(sources, prepare: PrepareExample, *, batch_size: int,
                       seed: int, shard_index: int | None = None,
                       shard_count: int | None = None, num_workers: int = 0,
                       max_consecutive_skips: int = 1000,
                       caption_dropout: float = 0.0) -> grain.IterDataset:
  """This host's endless stream of batches (dicts of numpy arrays + `skipped` counts).
  `sources`: one source, or [(source, weight), ...] mixed by weight (`caption_data`)."""
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  if not isinstance(sources, (list, tuple)):
    sources = [(sources, 1.0)]
  ds = caption_data.mixed_stream(sources, seed, caption_dropout)
  # Host i reads the i-th block of every global batch: 2 hosts x 4 devices train on what
  # 1 x 8 does, row for row (`pipeline.HostBlocks`).
  ds = pipeline.HostBlocks(ds.map(prepare), shard_index, shard_count, batch_size)
  ds = pipeline.DropSkipped(ds.to_iter_dataset(), sequence.SKIPS,
                            max_consecutive_skips=max_consecutive_skips)
  ds = ds.batch(batch_size, drop_remainder=True)
  return pipeline.CountSkips(pipeline.parallelize(ds, num_workers, 0), sequence.SKIPS,
                             batch_size=batch_size, drop_remainder=False)


# ---------------------------------------------------------------- a fixed evaluation set
def eval_batches(source: ConversationSource, prepare: PrepareExample, batch_size: int,
                 shard_index: int | None = None, shard_count: int | None = None
                 ) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
  """This host's share of `source`, prepared once, as full batches (every host the same
  number; padding rows score nothing). Returns (batches, skip counts)."""
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  examples, skipped = [], sequence.SKIPS.zeros()
  for i in range(shard_index, len(source), shard_count):
    example = prepare.map(source[i])
    if records.is_skipped(example):
      skipped[sequence.SKIPS.index(example["skip"])] += 1
      logging.warning("eval: skipping %r (%s): %s", example["key"], example["skip"],
                      example["error"])
    else:
      examples.append(example)
  per_host = -(-len(source) // shard_count)
  num_batches = max(-(-per_host // batch_size), 1)
  if not examples:
    raise ValueError(f"no usable evaluation samples in {source!r}: "
                     f"{sequence.SKIPS.to_dict(skipped)}")
  padding = {k: np.zeros_like(v) for k, v in examples[0].items() if k != "key"}
  batches = []
  for b in range(num_batches):
    rows = examples[b * batch_size:(b + 1) * batch_size]
    rows += [padding] * (batch_size - len(rows))
    batches.append({k: np.stack([r[k] for r in rows]) for k in padding})
  return batches, sequence.SKIPS.to_dict(skipped)

