"""Every `python -m dualtoken_jax.bench` subcommand runs on tiny shapes and prints its figures.

Run in-process through `bench.__main__.main` (the simulated devices come from conftest), one
iteration and no warm-up each, on one device where the bench takes `--devices`, with the
Gemma-2B-shaped compile-only parts skipped and one variant per subcommand where it times several
(train_step/memory without LPIPS + GAN, generate with CFG on the 32 px demo MLLM).
"""

import re

import pytest

from dualtoken_jax.bench import __main__ as bench

NUMBER = r"\d+\.\d+"
TINY = "demo_cpu:test"  # 32 px, 4x4 grid, no decoder res blocks: compiles in seconds

CASES = {
    "quantizer": (["--codebook_size=64", "--dim=8", "--depth=2", "--batch=2", "--tokens=16",
                   "--chunk=32", "--iters=1", "--warmup=0"],
                  [rf"RVQ (eval|per_level|pooled) K=64 d=8 D=2 N=32 +{NUMBER}"]),
    "encode": ([f"--configs={TINY}", "--batch=2", "--iters=1", "--warmup=0", "--no_flop_count"],
               [rf"encode {TINY} 32px B=2 +{NUMBER}", rf"decode {TINY} 32px B=2 +{NUMBER}"]),
    "train_step": ([f"--config={TINY}", "--devices=1", "--batch=2", "--iters=1", "--warmup=0",
                    "--lpips_gan=off", "--no_flop_count"],
                   [rf"train {TINY} B=2 no LPIPS/GAN +{NUMBER}"]),
    "memory": ([f"--config={TINY}", "--batch_per_device=1", "--fsdp=2", "--no_lpips_gan"],
               [rf"peak per device ~ {NUMBER} GiB", rf"optimiser state {NUMBER} GiB"]),
    "evaluate": ([f"--configs={TINY}", "--devices=1", "--batch=1", "--iters=1", "--warmup=0"],
                 [rf"total {TINY} 32px B=1 +{NUMBER}", rf"{TINY}: {NUMBER} images/s"]),
    "decode": (["--skip_2b", "--prompt=4", "--new=4", "--iters=1", "--warmup=0"],
               ["identical tokens: True", rf"KV cache +{NUMBER} ms/call", "speed-up of the cache"]),
    "generate": (["--config=demo_mllm_cpu:test", "--skip_2b", "--images=1", "--iters=1",
                  "--warmup=0", "--cfg=on"],
                 [r"CFG \(batch 2B\) +\d+ image positions/s", rf"{NUMBER} s/image"]),
    "conv": (["--single=1,8,8,4,4,3", "--config=none", "--impls=xla,shifted", "--iters=1",
              "--warmup=0", "--rounds=1"],
             [rf"3x3 +4->4 +8x8 B=1 +0 +{NUMBER} ms +{NUMBER} ms +{NUMBER} ms +{NUMBER} ms"]),
    # Timing it, even --smoke, takes minutes on CPU: here only its plan (arguments and sections).
    "device": (["--plan", "--models", "so400m"],
               [r"attention impls \['chunked', 'xla'", r"plan: attention \(8, 729, 16, 72\)",
                r"plan: nearest \(23328, 16384, 32\)", r"plan: train_step \('dualtoken_so400m', 32\)"]),
}


def test_every_subcommand_is_covered():
  assert set(CASES) == set(bench.BENCHMARKS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_subcommand_prints_its_figures(name, capsys):
  argv, patterns = CASES[name]
  assert bench.main([name, *argv]) == 0
  out = capsys.readouterr().out
  for pattern in patterns:
    assert re.search(pattern, out), f"{pattern!r} not in:\n{out}"


def test_unknown_subcommand_is_a_usage_error(capsys):
  assert bench.main(["nope"]) == 2
  assert "usage: python -m dualtoken_jax.bench" in capsys.readouterr().out
