"""Reconstruct images through the tokenizer and write a side-by-side PNG grid.

  python -m dualtoken_jax.reconstruct --config configs/dualtoken_tiny.py --output recon.png
  python -m dualtoken_jax.reconstruct --checkpoint TOKENIZER_DIR photos/ --output recon.png

Each row shows an input (eval geometry) and its reconstruction from the pixel codes, with the
PSNR in the caption. Inputs default to `sample` (photos bundled with installed packages).
Unreadable files are reported and skipped (exit status 1 if any were).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image, ImageDraw

from dualtoken_jax.data import image_inputs
from dualtoken_jax.cli import tokenizer_flags as tokenizer_source


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8, clamped (the reference's (y+1)*127.5 mapping)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def psnr(x: np.ndarray, y: np.ndarray) -> float:
  """PSNR in dB of two uint8 images (data range 255)."""
  mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
  return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def side_by_side(originals: np.ndarray, reconstructions: np.ndarray, captions: list[str],
                 columns: int = 2) -> Image.Image:
  """A grid of [original | reconstruction] pairs with a caption strip under each pair."""
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


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.reconstruct", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("inputs", nargs="*", default=[image_inputs.SAMPLE], help="files, folders or 'sample'")
  tokenizer_source.add_flags(p)
  p.add_argument("--output", required=True, help="PNG to write")
  p.add_argument("--max_images", type=int, default=16)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--columns", type=int, default=2)
  args = p.parse_args(argv)

  items = image_inputs.collect(args.inputs)[:args.max_images]
  tok = tokenizer_source.load(args)
  originals, recons, captions, skipped = [], [], [], []
  for batch in image_inputs.batches(items, tok.config.image_size, args.batch_size):
    skipped += batch.skipped
    if batch.keys:
      x, y = to_uint8(batch.images), to_uint8(tok.reconstruct(batch.images))
      originals.append(x)
      recons.append(y)
      captions += [f"{k.split('/')[-1][:24]}  {psnr(a, b):.1f} dB" for k, a, b in zip(batch.keys, x, y)]
  for key, reason in skipped:
    print(f"skipped {key}: {reason}", file=sys.stderr)
  if not captions:
    print("no readable images", file=sys.stderr)
    return 1
  x, y = np.concatenate(originals), np.concatenate(recons)
  side_by_side(x, y, captions, args.columns).save(args.output)
  mean = np.mean([psnr(a, b) for a, b in zip(x, y)])
  print(f"wrote {args.output}: {len(x)} image(s), mean PSNR {mean:.2f} dB")
  return 1 if skipped else 0


if __name__ == "__main__":
  sys.exit(main())
