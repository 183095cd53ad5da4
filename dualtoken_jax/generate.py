"""Generate images from a caption with a trained DualToken MLLM (spec D.3).

  python -m dualtoken_jax.generate --checkpoint workdirs/mllm_demo --prompt "a photo of a cat" \
      --out cat.png --n 4
  python -m dualtoken_jax.generate --checkpoint RUN --prompt "..." --out x.png --cfg_scale 0

`--checkpoint` is a `train_mllm` workdir (its newest checkpoint), its `checkpoints/`
directory, or one step directory. Defaults follow VILA-U / the paper: classifier-free guidance
3 (`--cfg_scale 0` turns the unconditional half off), temperature 1, top-k 900, top-p 0.96.
The same `--seed` gives the same images. Writes `OUT` (n = 1) or `OUT_STEM_{i}.png`, and
`OUT_STEM_codes.npz` with the pixel and semantic codes (n, g, g, D). An `--out` that cannot be
written fails before the model is loaded (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dualtoken_jax.cli import outputs
from dualtoken_jax.mllm.inference import UnifiedModel
from dualtoken_jax.data.images import to_uint8


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def image_paths(out: Path, n: int) -> list[Path]:
  if n == 1:
    return [out]
  return [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(n)]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="train_mllm workdir or checkpoint step dir")
  p.add_argument("--prompt", required=True, help="the caption of the image to generate")
  p.add_argument("--out", required=True, help="output PNG path")
  p.add_argument("--n", type=int, default=1, help="images to generate")
  p.add_argument("--cfg_scale", type=float, default=3.0, help="guidance scale; 0 = no CFG")
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=900, help="0 = off")
  p.add_argument("--top_p", type=float, default=0.96, help="1 = off")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tokenizer", "--spm_model", dest="spm_model",
                 help="text tokenizer: a SentencePiece .model or a HF tokenizer.json (default: "
                      "the run's own copy)")
  args = p.parse_args(argv)
  if args.n < 1:
    p.error(f"--n must be at least 1, got {args.n}")
  named = args.n == 1 or Path(args.out).suffix  # else OUT_STEM_{i}.png
  outputs.check(p, "--out", args.out, suffixes=IMAGE_SUFFIXES if named else ())
  try:
    model = UnifiedModel.from_checkpoint(args.checkpoint, spm_model=args.spm_model)
    out = model.generate_images(
        args.prompt, args.n, cfg_scale=args.cfg_scale or None, temperature=args.temperature,
        top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  target = Path(args.out)
  target.parent.mkdir(parents=True, exist_ok=True)
  for path, image in zip(image_paths(target, args.n), out["images"]):
    Image.fromarray(to_uint8(image)).save(path)
    print(f"wrote {path}")
  codes = target.with_name(f"{target.stem}_codes.npz")
  np.savez(codes, pixel=out["codes_pixel"], semantic=out["codes_semantic"],
           prompt=np.asarray(args.prompt))
  print(f"wrote {codes}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
