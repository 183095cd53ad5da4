"""Decoding image bytes (or decoded arrays) to 8-bit RGB with PIL, and the grain stage doing it.

Every PIL mode ends as 8-bit RGB:
- RGB: as is. L, 1, CMYK, YCbCr, LAB, HSV, RGBX: PIL's `convert("RGB")` (CMYK is the naive
  conversion; embedded ICC profiles are ignored).
- P: through RGBA when the palette has a transparent entry, otherwise straight to RGB.
- Alpha (RGBA, LA, PA, RGBa, and P with transparency): **composited on white** by default.
  Transparent pixels of web images often hold arbitrary colour (black, or leftovers of an
  editor), and a white page is what a browser shows behind a logo. The reference pipeline
  (open_clip `_convert_to_rgb`) instead drops alpha; `alpha="drop"` reproduces that. Only
  images with transparency differ.
- 16-bit (I;16, I;16B, I;16L, I;16N): rescaled to 8 bits with `round(v / 257)`, so 65535 -> 255.
  PIL's own conversion clips every value above 255 to white. 16-bit-per-channel RGB(A) PNGs
  are already reduced to 8 bits by PIL when it opens them.
- I (32-bit int): values <= 255 are taken as 8-bit, anything larger as 16-bit (clipped to
  [0, 65535], then / 257); PIL gives this mode no fixed range.
- F (32-bit float): values in [0, 1] are scaled by 255, otherwise clipped to [0, 255]. NaN -> 0.

Decompression bombs: an image whose header declares more than `max_pixels` pixels is rejected
before its pixels are decoded. PIL's global `Image.MAX_IMAGE_PIXELS` check stays in force as
an outer limit (its `DecompressionBombError` is reported as "too_large" too); this module never
disables it. Truncated files are errors (PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` must stay
False, its default), multi-frame files (GIF, APNG, TIFF) give their first frame, and the EXIF
orientation tag is ignored, as in the reference pipeline.
"""

from __future__ import annotations

import io
import os
import stat
from typing import Any

import grain
import numpy as np
from PIL import Image

from dualtoken_jax.data import records

# 8k x 8k. CC12M has a long tail of very large images; anything bigger costs seconds to decode
# for one 384 px crop and is more likely an attack or a scan than a photo.
DEFAULT_MAX_PIXELS = 8192 * 8192
# Bytes read from one image file: far above any real photo (an 8k x 8k PNG is ~100 MB only when
# it is noise), and a `/dev/zero`-like input stops here instead of at MemoryError.
DEFAULT_MAX_BYTES = 64 << 20

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255, 255)


class SkipImage(ValueError):
  """An image that cannot be used, with the `records.SKIP_REASONS` entry saying why."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def read_image_file(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
  """The bytes of the image file `path` (symlinks followed): only a regular file is read, and
  at most `max_bytes` of it, so a FIFO named `x.jpg` cannot block the reader forever nor a link
  to `/dev/zero` fill the memory. The one way every image input reads a file.

  Raises:
    SkipImage: "not_a_file" (FIFO, device, socket, directory), "too_large" (over `max_bytes`).
    OSError: as `open` does (e.g. FileNotFoundError for a file that vanished).
  """
  check_regular_file(path)
  # O_NONBLOCK: should the path become a FIFO after the stat, opening it still returns at once.
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
  with os.fdopen(fd, "rb") as f:
    size = _check_regular(path, os.fstat(f.fileno())).st_size
    if size > max_bytes:
      raise SkipImage("too_large", f"{size} bytes exceeds max_bytes={max_bytes}")
    data = f.read(max_bytes + 1)
  if len(data) > max_bytes:  # it grew while being read
    raise SkipImage("too_large", f"more than max_bytes={max_bytes} bytes")
  return data


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISDIR, "a directory"))


def check_regular_file(path: str | os.PathLike) -> os.stat_result:
  """The `os.stat` of `path` (symlinks followed) after checking it is a regular file, without
  opening it: the one check every input file gets, so a FIFO cannot block a reader.

  Raises:
    SkipImage: "not_a_file", naming the path and its kind (FIFO, device, socket, directory).
    OSError: as `os.stat` does (FileNotFoundError for a missing path).
  """
  return _check_regular(path, os.stat(path))


def _check_regular(path, st: os.stat_result) -> os.stat_result:
  if not stat.S_ISREG(st.st_mode):
    kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "a special file")
    raise SkipImage("not_a_file", f"{os.fspath(path)} is {kind}, not a regular file")
  return st


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 alpha: str = "white") -> Image.Image:
  """Decodes an encoded image file to a fully loaded 8-bit RGB PIL image.

  Args:
    data: the file's bytes (any format PIL reads).
    max_pixels: largest width * height accepted.
    alpha: "white" composites transparency on white, "drop" discards the alpha channel.

  Raises:
    SkipImage: with reason "empty", "too_large" or "decode_error". Callers that want to keep
      going count it; nothing else is raised for bad bytes.
  """
  _check_alpha(alpha)
  if not data:
    raise SkipImage("empty", "zero-byte image")
  try:
    img = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise SkipImage("too_large", str(e)) from e
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...).
    raise SkipImage("decode_error", f"{type(e).__name__}: {e}") from e
  return _load_rgb(img, max_pixels=max_pixels, alpha=alpha)


def pil_to_rgb(img: Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               alpha: str = "white") -> Image.Image:
  """An image another library already opened (e.g. a `datasets` row) as fully loaded 8-bit
  RGB, with the same size limit and mode rules as `decode_image`.

  Raises:
    SkipImage: "too_large" or "decode_error" as in `decode_image`.
  """
  _check_alpha(alpha)
  return _load_rgb(img, max_pixels=max_pixels, alpha=alpha)


def array_to_rgb(array: np.ndarray, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 alpha: str = "white") -> Image.Image:
  """An already decoded HW / HWC (C in 1, 2, 3, 4) array as an 8-bit RGB image.

  uint8 and bool arrays are taken as they are, uint16 arrays are rescaled like I;16 images
  and float arrays like F images (module docstring).

  Raises:
    SkipImage: "decode_error" for a shape or dtype PIL cannot represent, "too_large" as above.
  """
  _check_alpha(alpha)
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  # PIL has no multi-channel 16-bit or float modes; apply the I;16 and F rules here.
  if array.dtype == bool:
    array = array.astype(np.uint8) * 255
  elif array.dtype.kind == "u" and array.dtype.itemsize == 2:
    array = _to_uint8(array / 257.0)
  elif array.dtype.kind == "f":
    array = _float_to_uint8(array)
  try:
    img = Image.fromarray(array)
  except Exception as e:
    raise SkipImage("decode_error",
                    f"cannot make an image from an array of shape {array.shape} and dtype "
                    f"{array.dtype} (expected HW or HWC with C in 1..4)") from e
  return _load_rgb(img, max_pixels=max_pixels, alpha=alpha)


def _load_rgb(img: Image.Image, *, max_pixels: int, alpha: str) -> Image.Image:
  width, height = img.size
  if width * height > max_pixels:
    raise SkipImage("too_large", f"{width}x{height} pixels exceeds max_pixels={max_pixels}")
  if width == 0 or height == 0:
    raise SkipImage("decode_error", f"image has no pixels ({width}x{height})")
  try:
    img.load()  # Header parsing is lazy; this is where truncated / corrupt data fails.
    return to_rgb(img, alpha=alpha)
  except Image.DecompressionBombError as e:
    raise SkipImage("too_large", str(e)) from e
  except Exception as e:
    raise SkipImage("decode_error", f"{type(e).__name__}: {e}") from e


def to_rgb(img: Image.Image, *, alpha: str = "white") -> Image.Image:
  """Converts a PIL image of any mode to 8-bit RGB (rules in the module docstring)."""
  _check_alpha(alpha)
  mode = img.mode
  if mode == "RGB":
    return img
  if mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  elif mode in _SIXTEEN_BIT_MODES or mode == "I":
    values = np.asarray(img).astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
      values = np.clip(values, 0, 65535) / 257.0
    img = Image.fromarray(_to_uint8(values), "L")
  elif mode == "F":
    img = Image.fromarray(_float_to_uint8(np.asarray(img)), "L")
  elif mode == "La":
    img = Image.fromarray(_unpremultiply(np.asarray(img)), "LA")
  elif mode == "RGBa":
    img = img.convert("RGBA")

  if img.mode in _ALPHA_MODES:
    if alpha == "drop":
      return img.convert("RGB")
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
  return img.convert("RGB")


def _check_alpha(alpha: str) -> None:
  if alpha not in ("white", "drop"):
    raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")


def _to_uint8(values: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
  """Floats in [0, 1] are scaled by 255, anything else is taken as 0..255; NaN -> 0."""
  values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
  if values.size and values.min() >= 0.0 and values.max() <= 1.0:
    values = values * 255.0
  return _to_uint8(values)


def _unpremultiply(la: np.ndarray) -> np.ndarray:
  """Premultiplied luminance+alpha ("La", which PIL cannot convert) to straight LA."""
  lum, a = la[..., 0].astype(np.float64), la[..., 1].astype(np.float64)
  straight = np.where(a > 0, lum * 255.0 / np.maximum(a, 1.0), 0.0)
  return np.stack([_to_uint8(straight), la[..., 1]], axis=-1)


class DecodeImage(grain.transforms.Map):
  """Grain stage: source record -> `{"key", "image": RGB PIL image}`, or a skip record.

  Skip records from the source pass through unchanged; bad bytes become skip records.
  """

  def __init__(self, *, max_pixels: int = DEFAULT_MAX_PIXELS, alpha: str = "white"):
    _check_alpha(alpha)
    self._max_pixels = max_pixels
    self._alpha = alpha

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    if records.is_skipped(element):
      return element
    key = element.get("key", "")
    try:
      if "image_bytes" in element:
        img = decode_image(element["image_bytes"], max_pixels=self._max_pixels, alpha=self._alpha)
      elif "image" in element:
        img = array_to_rgb(element["image"], max_pixels=self._max_pixels, alpha=self._alpha)
      else:
        raise KeyError(f"record {key!r} has neither 'image_bytes' nor 'image' "
                       f"(fields: {sorted(element)}); is the source's image_key right?")
    except SkipImage as e:
      return records.skip_record(e.reason, key, str(e))
    return {"key": key, "image": img}
