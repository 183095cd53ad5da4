"""Benchmarks: `python -m dualtoken_jax.bench <name> [flags]`; `--help` lists them.

  quantizer   the RVQ at paper scale (K=16384, d=32, D=8, N=8x729)
  encode      tokenizer encode/decode, tiny and ViT-B/16-224 configs
  train_step  one training step (demo and ViT-B configs), with and without LPIPS + GAN
  memory      compiled per-device memory of a training step on a simulated mesh
  evaluate    reconstruction + rFID feature pass, images/s
  decode      MLLM decoding: KV cache vs recomputing the prefix (tiny timed, Gemma-2B-shaped
              compile-only), and the memory of a Gemma-2B-shaped SFT step under fsdp=8
  generate    MLLM image generation: image positions/s and s/image with and without CFG
              (demo model timed, Gemma-2B-shaped compile-only)
  device      the GPU/TPU check (under 8 min): attention implementations side by side, the
              fused Pallas nearest-code kernel vs XLA, B/16-224 and So400m-384 bf16 steps + MFU
  conv        the convolution implementations (model.conv_impl) side by side, forward and
              forward + backward: one 3x3 conv and every conv shape of a config's pixel decoder

Each prints median times (after warm-up), XLA's FLOP and memory figures, and the achieved
GFLOP/s as a fraction of a plain matmul measured in the same run. README figures come from here.
"""

import importlib
import os
import sys

BENCHMARKS = ("quantizer", "encode", "train_step", "memory", "evaluate", "decode", "generate",
              "device", "conv")


def main(argv: list[str]) -> int:
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
    print(f"usage: python -m dualtoken_jax.bench {{{','.join(BENCHMARKS)}}} [flags]\n\n{__doc__}")
    return 0 if argv and argv[0] in ("-h", "--help") else 2
  if argv[0] in ("memory", "decode"):  # simulated devices must exist before jax starts
    n = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), "8")
    flags = f"--xla_force_host_platform_device_count={n}"
    if argv[0] == "memory":  # keep remat's optimisation barriers, as TPU/GPU do (memory.py)
      flags += " --xla_disable_hlo_passes=cse_barrier_expander"
    os.environ.setdefault("XLA_FLAGS", flags)
  module = importlib.import_module(f"dualtoken_jax.bench.{argv[0]}")
  print(module.run(argv[1:]))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
