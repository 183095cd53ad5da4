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

from dualtoken_jax.data import image_inputs
from dualtoken_jax.data.images import psnr, side_by_side, to_uint8
from dualtoken_jax.cli import tokenizer_flags as tokenizer_source


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
