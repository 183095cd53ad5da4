"""Shared benchmark plumbing: compile once, read XLA's cost and memory analyses, time medians.

Speed is reported as achieved GFLOP/s next to a plain f32 matmul measured in the same process,
because absolute times on shared machines are noisy but ratios within one run are not; on a chip
with a known bf16 peak (`training/perf.py`: TPU v4-v6e, A100/H100/H200) also as MFU.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dualtoken_jax.training import perf


@dataclasses.dataclass
class Measurement:
  name: str
  median_s: float
  flops: float            # per call, from XLA's cost analysis
  peak_bytes: int         # arguments + outputs + temporaries - aliased, from XLA
  temp_bytes: int

  @property
  def gflops_per_s(self) -> float:
    return self.flops / self.median_s / 1e9


def cost(compiled) -> dict[str, Any]:
  analysis = compiled.cost_analysis()
  return analysis[0] if isinstance(analysis, (list, tuple)) else (analysis or {})


def memory(compiled) -> tuple[int, int]:
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)
  return int(peak), int(m.temp_size_in_bytes)


def median_time(fn: Callable, *args, warmup: int = 2, iters: int = 20) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def add_timing_flags(parser, iters: int = 20, warmup: int = 2) -> None:
  """`--iters` and `--warmup`, shared by every timed benchmark (`--iters 1 --warmup 0`: a quick
  check that everything compiles and runs, times from a single call)."""
  parser.add_argument("--iters", type=int, default=iters,
                      help=f"timed calls per measurement, median reported (default {iters})")
  parser.add_argument("--warmup", type=int, default=warmup,
                      help=f"untimed calls before each measurement (default {warmup})")


def measure(name: str, fn: Callable, args: tuple, *, flops_fn: Callable | None = None,
            iters: int = 20, warmup: int = 2) -> Measurement:
  """Times `jax.jit(fn)(*args)`. XLA's cost analysis counts a while loop's body once, so pass
  `flops_fn`, an equivalent loop-free function, when `fn` loops (e.g. chunked distances)."""
  jitted = lambda f: f if hasattr(f, "lower") else jax.jit(f)  # keep explicit shardings
  compiled = jitted(fn).lower(*args).compile()
  flops_source = jitted(flops_fn).lower(*args).compile() if flops_fn else compiled
  peak, temp = memory(compiled)
  return Measurement(name, median_time(compiled, *args, warmup=warmup, iters=iters),
                     float(cost(flops_source).get("flops", 0.0)), peak, temp)


def matmul_baseline(n: int = 2048, iters: int = 20, warmup: int = 2) -> Measurement:
  """A plain f32 (n x n) @ (n x n) matmul: the machine's reference GFLOP/s for this run."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  return measure(f"matmul f32 {n}x{n}", jnp.matmul, (a, b), iters=iters, warmup=warmup)


def mfu(r: Measurement, peak: float | None) -> str:
  """Model FLOPs utilisation of one device against its bf16 peak; "-" where none is known."""
  return f"{100 * r.flops / r.median_s / peak:5.1f}%" if peak else "-"


def table(rows: list[Measurement], baseline: Measurement) -> str:
  peak = perf.peak_flops()
  head = (f"{'benchmark':44s} {'median ms':>10s} {'GFLOP':>9s} {'GFLOP/s':>9s} {'% matmul':>9s} "
          f"{'peak MiB':>9s} {'temp MiB':>9s} {'MFU':>6s}")
  lines = [head, "-" * len(head)]
  for r in [baseline] + rows:
    lines.append(f"{r.name:44s} {r.median_s * 1e3:10.2f} {r.flops / 1e9:9.2f} {r.gflops_per_s:9.1f} "
                 f"{100 * r.gflops_per_s / baseline.gflops_per_s:8.1f}% {r.peak_bytes / 2**20:9.1f} "
                 f"{r.temp_bytes / 2**20:9.1f} {mfu(r, peak):>6s}")
  if peak is None:
    lines.append("MFU: no bf16 peak known for this device (training/perf.py), FLOP/s only")
  lines.append(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
  return "\n".join(lines)
