"""Command-line choice of a tokenizer, shared by the programs (tokenize, reconstruct, convert, …).

Exactly one of:
  --checkpoint DIR                        this project's format (`DualTokenizer.save`), or a
                                          `dualtoken_jax.train` workdir (its newest checkpoint)
  --reference CKPT [--reference_config J] the PyTorch reference's .pt / .safetensors + config.json
  --config CFG [--siglip PATH]            a fresh model from a config file, SigLIP towers from a
                                          HF dir / big_vision npz if given, else random (demos)
"""

from __future__ import annotations

import argparse

from dualtoken_jax import config_files
from dualtoken_jax.tokenizer import DualTokenizer


def add_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("tokenizer (choose one source)")
  g.add_argument("--checkpoint", help="a tokenizer saved by DualTokenizer.save / convert, or a "
                 "`dualtoken_jax.train` workdir or checkpoint step directory")
  g.add_argument("--reference", help="the PyTorch reference checkpoint (.pt or .safetensors)")
  g.add_argument("--reference_config", help="its config.json (default: beside the checkpoint)")
  g.add_argument("--config", help="a config file, e.g. configs/dualtoken_tiny.py (random init)")
  g.add_argument("--siglip", help="with --config: SigLIP weights (HF dir or big_vision .npz)")
  g.add_argument("--seed", type=int, default=0, help="with --config: init seed")


def load(args: argparse.Namespace) -> DualTokenizer:
  sources = [s for s in ("checkpoint", "reference", "config") if getattr(args, s)]
  if len(sources) != 1:
    raise SystemExit("choose exactly one tokenizer source: --checkpoint, --reference or --config "
                     f"(got {', '.join('--' + s for s in sources) or 'none'})")
  if args.checkpoint:
    return DualTokenizer.load(args.checkpoint)
  if args.reference:
    return DualTokenizer.from_reference(args.reference, args.reference_config)
  model = config_files.model_of(config_files.load(args.config))
  if args.siglip:
    return DualTokenizer.from_siglip(model, args.siglip, seed=args.seed)
  return DualTokenizer.from_config(model, seed=args.seed)
