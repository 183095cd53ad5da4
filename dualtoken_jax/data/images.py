"""Model-space images ([-1, 1] floats, SigLIP's `x / 127.5 - 1`) to viewable ones, and back-of-
the-envelope PSNR.

  to_uint8      [-1, 1] -> uint8 levels: clamp, round((y + 1) · 127.5) (the reference's mapping)
  to_unit       [-1, 1] -> [0, 1]: clamp, (y + 1) / 2 (the reference's input to PSNR / SSIM)
  side_by_side  a sheet of [original | reconstruction] uint8 pairs with captions
  psnr          exact host-side PSNR of one image pair (inf when identical)

`to_uint8` and `to_unit` take numpy or JAX arrays (also inside `jit`) and return the same kind.
The metric of record on device is `metrics.image_quality.psnr` (pyiqa's definition).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw


def _xp(x):
  """jax.numpy for JAX arrays (and tracers), numpy for everything else."""
  return jnp if isinstance(x, jax.Array) else np


def to_unit(images):
  """[-1, 1] floats (decoder output: unbounded) -> [0, 1]: clamp to [-1, 1], then (y + 1) / 2."""
  xp = _xp(images)
  return (xp.clip(images, -1.0, 1.0) + 1.0) * 0.5


def to_uint8(images):
  """[-1, 1] floats -> uint8, clamped: round((y + 1) · 127.5), halves to even as numpy."""
  xp = _xp(images)
  images = images if xp is jnp else np.asarray(images, np.float32)
  return xp.round(to_unit(images) * 255.0).astype(xp.uint8)


def psnr(x, y, data_range: float = 255.0) -> float:
  """PSNR in dB of two images, in float64 on the host: 10·log10(R² / MSE); inf if identical.

  `data_range` R is the span of the values: 255 for uint8 images, 2 for [-1, 1] floats.
  """
  mse = np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
  return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def side_by_side(originals: np.ndarray, reconstructions: np.ndarray, captions: list[str],
                 columns: int = 2) -> Image.Image:
  """A grid of [original | reconstruction] uint8 pairs with a caption strip under each pair."""
  n, size = len(originals), originals.shape[1]
  pad, text_h = 4, 14
  cell_w, cell_h = 2 * size + 3 * pad, size + text_h + 2 * pad
  rows = -(-n // columns)
  sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
  draw = ImageDraw.Draw(sheet)
  for i in range(n):
    x0, y0 = (i % columns) * cell_w, (i // columns) * cell_h
    sheet.paste(Image.fromarray(originals[i]), (x0 + pad, y0 + pad))
    sheet.paste(Image.fromarray(reconstructions[i]), (x0 + 2 * pad + size, y0 + pad))
    draw.text((x0 + pad, y0 + pad + size + 1), captions[i], fill="black")
  return sheet
