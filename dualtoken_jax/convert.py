"""Convert tokenizer checkpoints between the PyTorch reference layout and this project's format.

  # reference (.pt or .safetensors + config.json) -> ours (Orbax + config.json)
  python -m dualtoken_jax.convert --reference ckpt.pt --output tokenizer_dir
  # ours -> reference layout (.safetensors + config.json beside it)
  python -m dualtoken_jax.convert --checkpoint tokenizer_dir --to_reference out/model.safetensors
  # a new tokenizer: real SigLIP towers + random DualToken parts (a training starting point)
  python -m dualtoken_jax.convert --config configs/dualtoken_so400m.py:res=384 \
      --siglip siglip2_so400m14_384.npz --output init_dir
"""

from __future__ import annotations

import argparse
import sys

from dualtoken_jax.models import config as model_config
from dualtoken_jax.cli import tokenizer_flags as tokenizer_source


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  tokenizer_source.add_flags(p)
  out = p.add_mutually_exclusive_group(required=True)
  out.add_argument("--output", help="write this project's format to this directory")
  out.add_argument("--to_reference", help="write the reference layout to this .safetensors file")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
  args = p.parse_args(argv)
  tok = tokenizer_source.load(args)
  if args.output:
    tok.save(args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: {model_config.describe(tok.config)}")
  else:
    tok.export_reference(args.to_reference)
    print(f"wrote {args.to_reference} and its config.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
