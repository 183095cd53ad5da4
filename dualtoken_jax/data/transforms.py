"""Train and eval geometry (spec A.2) on RGB PIL images, and the [-1, 1] float output.

Train: RandomResizedCrop to `resolution`, scale (0.9, 1.0), ratio (3/4, 4/3), bicubic, no flip.
Eval: resize the shorter side to `resolution` (bicubic), then a centre crop.
Both reproduce torchvision's algorithms (which the reference uses through open_clip) with a
numpy generator in place of torch's RNG, and PIL resampling, so the pixels match torchvision's
PIL backend for the same crop box. Output: float32 HWC, `x / 127.5 - 1` (SigLIP's mean = std
= 0.5). `load_image` applies the eval path to a single file, for inference.
"""

from __future__ import annotations

import math
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

from dualtoken_jax.data import decode
from dualtoken_jax.data import records

TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, *,
                            scale=TRAIN_SCALE, ratio=TRAIN_RATIO) -> tuple[int, int, int, int]:
  """torchvision `RandomResizedCrop.get_params`: returns (top, left, crop_h, crop_w).

  Ten attempts at a box with area fraction ~ U(scale) and log-aspect ~ U(log ratio) that fits;
  otherwise the whole image, centre-cropped to the nearest allowed aspect ratio.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: Image.Image, resolution: int, rng: np.random.Generator, *,
                        scale=TRAIN_SCALE, ratio=TRAIN_RATIO) -> Image.Image:
  """A `resolution`-square bicubic resize of a random crop (torchvision `resized_crop`)."""
  top, left, h, w = random_resized_crop_box(img.height, img.width, rng, scale=scale, ratio=ratio)
  # Crop first, then resize: resizing with `box=` would let the filter read pixels outside
  # the box and differ from torchvision at the crop's border.
  crop = img.crop((left, top, left + w, top + h))
  return crop.resize((resolution, resolution), Image.BICUBIC)


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """torchvision `Resize(size)` output (h, w): shorter side -> size, longer side truncated."""
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
  """torchvision `CenterCrop` (top, left) for a `size` square (image at least size x size)."""
  return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
  """Eval geometry: shorter side to `resolution` (bicubic), then a centre crop."""
  h, w = shorter_side_size(img.height, img.width, resolution)
  if (h, w) != (img.height, img.width):
    img = img.resize((w, h), Image.BICUBIC)
  top, left = center_crop_box(h, w, resolution)
  return img.crop((left, top, left + resolution, top + resolution))


def to_float(img: Image.Image) -> np.ndarray:
  """uint8 RGB image -> float32 HWC array in [-1, 1]."""
  return np.asarray(img, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def load_image(image: str | os.PathLike | bytes, size: int, *, alpha: str = "white",
               max_bytes: int = decode.DEFAULT_MAX_BYTES) -> np.ndarray:
  """One image file (path or bytes) with the eval geometry: float32 [size, size, 3] in [-1, 1].

  For inference and demos; stack several with `np.stack` to make a batch.

  Raises:
    decode.SkipImage (a ValueError): the file is empty, corrupt, too large (pixels, or more
      than `max_bytes` bytes), or not a regular file (a FIFO, a device).
  """
  if not isinstance(image, bytes):
    image = decode.read_image_file(image, max_bytes=max_bytes)
  return to_float(resize_center_crop(decode.decode_image(image, alpha=alpha),
                                     _check_resolution(size)))


def _check_resolution(resolution: int) -> int:
  if not isinstance(resolution, (int, np.integer)) or resolution <= 0:
    raise ValueError(f"resolution must be a positive int, got {resolution!r}")
  return int(resolution)


class TrainPreprocess(grain.transforms.RandomMap):
  """Grain stage: `{"key", "image": PIL}` -> `{"key", "image": float32 [res, res, 3]}`.

  The crop comes from the generator grain derives from the pipeline seed and the record's
  position in the (repeated) stream, so it is reproducible and differs between epochs.
  Skip records pass through.
  """

  def __init__(self, resolution: int, *, scale=TRAIN_SCALE, ratio=TRAIN_RATIO):
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
      raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not 0.0 < ratio[0] <= ratio[1]:
      raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
    self._resolution = _check_resolution(resolution)
    self._scale = tuple(scale)
    self._ratio = tuple(ratio)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if records.is_skipped(element):
      return element
    img = random_resized_crop(element["image"], self._resolution, rng,
                              scale=self._scale, ratio=self._ratio)
    return {"key": element["key"], "image": to_float(img)}


class EvalPreprocess(grain.transforms.Map):
  """Grain stage: `{"key", "image": PIL}` -> resized, centre-cropped float32; skips pass."""

  def __init__(self, resolution: int):
    self._resolution = _check_resolution(resolution)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    if records.is_skipped(element):
      return element
    img = resize_center_crop(element["image"], self._resolution)
    return {"key": element["key"], "image": to_float(img)}
