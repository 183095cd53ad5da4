"""Benchmarks: `python -m dualtoken_jax.bench <name> [flags]`; `--help` lists them.

Each prints median step times (after warm-up), XLA's FLOP and memory figures, and the achieved
GFLOP/s as a fraction of a plain matmul measured in the same run. README figures come from here.
"""

import sys

from dualtoken_jax.bench import encode, quantizer

BENCHMARKS = {
    "quantizer": quantizer.run,
    "encode": encode.run,
}


def main(argv: list[str]) -> int:
  if len(argv) < 1 or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
    print(f"usage: python -m dualtoken_jax.bench {{{','.join(BENCHMARKS)}}} [flags]\n\n{__doc__}")
    return 0 if argv and argv[0] in ("-h", "--help") else 2
  print(BENCHMARKS[argv[0]](argv[1:]))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
