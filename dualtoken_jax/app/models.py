"""Which models the app serves: chosen on the command line, loaded once at start-up and shared
by every request, each with the reason it could not be loaded (shown in its tab instead).

The tokenizer is any source the tokenizer CLIs accept (`cli.tokenizer_flags`: a saved
tokenizer or training workdir, a reference checkpoint, or a config for a random one) and
defaults to the README's demo tokenizer, `workdirs/demo`; the unified model is a `train_mllm`
workdir (`UnifiedModel.from_checkpoint`) and defaults to the README's MLLM demo,
`workdirs/mllm_demo`. A missing default is not replaced by a random model: the tab says which
command creates it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any

from dualtoken_jax.cli import tokenizer_flags
from dualtoken_jax.mllm.inference import UnifiedModel

DEFAULT_TOKENIZER = "workdirs/demo"
DEFAULT_MLLM = "workdirs/mllm_demo"
TOKENIZER_COMMAND = ("python -m dualtoken_jax.train --config configs/demo_cpu.py "
                     "--workdir workdirs/demo")
MLLM_COMMAND = ("python -m dualtoken_jax.train_mllm --config configs/demo_mllm_cpu.py "
                "--workdir workdirs/mllm_demo --config.init.tokenizer=workdirs/demo")


@dataclasses.dataclass
class Loaded:
  """A loaded model and where it came from, or (model None) why there is none."""
  model: Any
  source: str
  problem: str | None = None


def add_flags(parser: argparse.ArgumentParser) -> None:
  tokenizer_flags.add_flags(parser)
  parser.add_argument("--tokenizer", dest="checkpoint",
                      help=f"the same as --checkpoint (default: {DEFAULT_TOKENIZER} if it exists)")
  parser.add_argument("--mllm", default=None,
                      help=f"a train_mllm workdir or step directory (default: {DEFAULT_MLLM})")


def load_tokenizer(args: argparse.Namespace) -> Loaded:
  """The tokenizer the flags choose (the demo workdir when none is given)."""
  chosen = [s for s in ("checkpoint", "reference", "config") if getattr(args, s)]
  if not chosen:
    if not os.path.isdir(DEFAULT_TOKENIZER):
      return Loaded(None, DEFAULT_TOKENIZER,
                    f"No tokenizer: the default `{DEFAULT_TOKENIZER}` does not exist. Create it "
                    f"with `{TOKENIZER_COMMAND}` (README command 1), or start the app with "
                    "`--tokenizer DIR` / `--reference CKPT`. (A random tokenizer is no default: "
                    "pass `--config configs/demo_cpu.py` to look at one anyway.)")
    args = argparse.Namespace(**{**vars(args), "checkpoint": DEFAULT_TOKENIZER})
  source = args.checkpoint or args.reference or f"{args.config} (random weights)"
  return _attempt(lambda: tokenizer_flags.load(args), source, "tokenizer")


def load_mllm(path: str | None) -> Loaded:
  """The unified model of a train_mllm run (the demo workdir when `path` is None)."""
  if path is None:
    path = DEFAULT_MLLM
    if not os.path.isdir(path):
      return Loaded(None, path,
                    f"No unified model: the default `{path}` does not exist. Create it with "
                    f"`{MLLM_COMMAND}` (after README command 1), or start the app with "
                    "`--mllm DIR` (a train_mllm workdir).")
  return _attempt(lambda: UnifiedModel.from_checkpoint(path), path, "unified model")


def _attempt(load, source: str, what: str) -> Loaded:
  # The page boundary: whatever stops a checkpoint loading is shown in its tab (and logged),
  # and the other tabs are still served.
  try:
    return Loaded(load(), source)
  except Exception as e:  # pylint: disable=broad-except
    logging.exception("could not load the %s from %s", what, source)
    return Loaded(None, source, f"Could not load the {what} from `{source}`: "
                                f"{type(e).__name__}: {e}")
