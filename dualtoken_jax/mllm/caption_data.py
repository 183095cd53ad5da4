"""Caption -> image pairs for generation training (stages 3 and 4), and the mixed stream.

Sources (`config.data.captions`):
  *.json / *.jsonl   records {"image": path, "caption": text} ("text" also accepted), image
                     paths resolved against `config.data.image_root`
  *.tar (patterns)   webdataset shards: `{key}.jpg` + `{key}.txt` (or `.json` "caption"), the
                     img2dataset layout (`data.webdataset.WebDatasetSource`)

Each record becomes {"key", "image" (path) or "image_bytes", "caption"}; `mllm.data.
PrepareExample` turns it into a generation example (`sequence.build_generation_example`).
`CaptionDropout` replaces a fraction of captions by "" — the unconditional prompt that
classifier-free guidance contrasts with — deterministically per (seed, position in the stream).
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain

from dualtoken_jax.data import records
from dualtoken_jax.data.webdataset import WebDatasetSource
from dualtoken_jax.mllm import sequence


class CaptionSource:
  """Random access to caption-image pairs from JSON/JSONL or webdataset tar shards."""

  def __init__(self, path: str, image_root: str = ""):
    self._path = os.fspath(path)
    self._root = os.fspath(image_root)
    self._items = None
    self._tar = None
    if self._path.endswith((".json", ".jsonl")):
      if not os.path.isfile(self._path):
        raise FileNotFoundError(f"caption file not found: {self._path}")
      with open(self._path, encoding="utf-8") as f:
        text = f.read()
      if text.lstrip().startswith("["):
        items = json.loads(text)
      else:
        items = [_parse_line(line) for line in text.splitlines() if line.strip()]
      self._items = items
    else:
      self._tar = WebDatasetSource(self._path, with_captions=True)
    if len(self) == 0:
      raise ValueError(f"{self._path} holds no caption-image pairs")

  def __len__(self) -> int:
    return len(self._items) if self._items is not None else len(self._tar)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if self._tar is not None:
      record = self._tar[index]
      if records.is_skipped(record):
        return record
      if not record.get("caption"):
        return sequence.SKIPS.record("bad_caption", record["key"],
                                     "tar sample without a caption")
      return record
    key = f"{os.path.basename(self._path)}/{index}"
    item = self._items[index]
    if item is None:
      return sequence.SKIPS.record("bad_caption", key, "unparsable JSON line")
    if not isinstance(item, dict):
      return sequence.SKIPS.record("bad_caption", key,
                                   f"record is a {type(item).__name__}, not an object")
    caption = item.get("caption", item.get("text"))
    image = item.get("image")
    if not isinstance(caption, str) or not isinstance(image, str):
      return sequence.SKIPS.record("bad_caption", str(item.get("id", key)),
                                   "records need string 'image' and 'caption' (or 'text') fields")
    if self._root and not os.path.isabs(image):
      image = os.path.join(self._root, image)
    return {"key": str(item.get("id", key)), "image": image, "caption": caption}

  def __repr__(self) -> str:
    return f"CaptionSource({self._path!r}, samples={len(self)})"


def _parse_line(line: str):
  try:
    return json.loads(line)
  except ValueError:
    return None  # becomes a "bad_caption" skip when read


class CaptionDropout(grain.transforms.RandomMap):
  """Replaces the caption with "" with probability `rate` (for classifier-free guidance)."""

  def __init__(self, rate: float):
    self._rate = float(rate)

  def random_map(self, record, rng):
    if self._rate and "caption" in record and rng.random() < self._rate:
      return {**record, "caption": ""}
    return record


def mixed_stream(sources_and_weights, seed: int, caption_dropout: float) -> grain.MapDataset:
  """Endless, shuffled (every epoch) and, for several sources, weight-mixed records."""
  streams, weights = [], []
  for i, (source, weight) in enumerate(sources_and_weights):
    ds = grain.MapDataset.source(source).shuffle(seed=seed + i).repeat(None)
    if isinstance(source, CaptionSource):
      ds = ds.random_map(CaptionDropout(caption_dropout), seed=seed + 1000 + i)
    streams.append(ds)
    weights.append(float(weight))
  if len(streams) == 1:
    return streams[0]
  return grain.MapDataset.mix(streams, weights)
