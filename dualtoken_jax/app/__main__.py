"""`python -m dualtoken_jax.app [--tokenizer DIR] [--mllm DIR] [--port 7860]`: the browser app.

Loads the models (defaults: the README's demo workdirs, `workdirs/demo` and
`workdirs/mllm_demo`; a tab whose model is missing says which command creates it), builds the
page and serves it on http://127.0.0.1:PORT/ until interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dualtoken_jax.app import models, page


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.app", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  models.add_flags(p)
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: all)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  tokenizer, mllm = models.load_tokenizer(args), models.load_mllm(args.mllm)
  for what, loaded in (("tokenizer", tokenizer), ("unified model", mllm)):
    logging.info("%s: %s", what, loaded.problem or f"loaded from {loaded.source}")
  print(f"serving on http://{args.host}:{args.port}/", flush=True)
  page.launch(page.build(tokenizer, mllm), args.port, args.host)
  return 0


if __name__ == "__main__":
  sys.exit(main())
