"""Image inputs for the command-line tools: files, folders (recursive) or the bundled photos.

`collect(["photos/", "x.jpg", "sample"])` lists (key, path) pairs; `batches(items, size, n)`
decodes them with the eval geometry (shorter side -> size, centre crop) and yields batches,
reporting files that cannot be read instead of stopping.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dualtoken_jax.data import sample_photos, sources
from dualtoken_jax.data.decode import DEFAULT_MAX_BYTES, SkipImage
from dualtoken_jax.data.transforms import load_image

SAMPLE = "sample"  # the photos bundled with scikit-image / scikit-learn / matplotlib


def collect(specs: Sequence[str]) -> list[tuple[str, str]]:
  """(key, path) for every image named by `specs`, in order, without duplicates."""
  items: dict[str, str] = {}
  for spec in specs:
    if spec == SAMPLE:
      items.update(sample_photos.sample_photo_paths())
    elif os.path.isdir(spec):
      for key in sources.ImageFolderSource(spec).keys:
        items[os.path.join(spec, key)] = os.path.join(spec, key)
    elif os.path.exists(spec):
      items[spec] = spec
    else:
      raise FileNotFoundError(f"no such image, folder or '{SAMPLE}': {spec}")
  return list(items.items())


@dataclasses.dataclass
class Batch:
  keys: list[str]
  images: np.ndarray             # float32 (n, size, size, 3) in [-1, 1]
  skipped: list[tuple[str, str]]  # (key, reason) of files in this slice that could not be used


def batches(items: Sequence[tuple[str, str]], size: int, batch_size: int, *,
            max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[Batch]:
  """Batches of `batch_size` items; FIFOs, devices and files over `max_bytes` are skipped."""
  for start in range(0, len(items), batch_size):
    keys, images, skipped = [], [], []
    for key, path in items[start:start + batch_size]:
      try:
        images.append(load_image(Path(path), size, max_bytes=max_bytes))
        keys.append(key)
      except (SkipImage, OSError) as e:
        skipped.append((key, f"{type(e).__name__}: {e}"))
    array = np.stack(images) if images else np.zeros((0, size, size, 3), np.float32)
    yield Batch(keys, array, skipped)
