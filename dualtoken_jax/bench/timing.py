"""Shared benchmark plumbing: compile once, read XLA's cost and memory analyses, time medians.

Speed is reported as achieved GFLOP/s next to a plain f32 matmul measured in the same process,
because absolute times on shared machines are noisy but ratios within one run are not; on a chip
with a known bf16 peak (`training/perf.py`: TPU v4-v6e, A100/H100/H200) also as MFU.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import re
import statistics
import tempfile
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


def compile_fn(fn: Callable, args: tuple):
  """`fn` compiled for `args`: a jitted function keeps its explicit shardings, a plain one is
  jitted, an already compiled one is returned as it is."""
  if hasattr(fn, "cost_analysis"):
    return fn
  return (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args).compile()


def measure_alternated(entries: list[tuple[str, Callable, tuple, Callable | None]], *,
                       rounds: int, iters: int = 20, warmup: int = 2) -> list[Measurement]:
  """Like `measure` for each (name, fn, args, flops_fn) entry, the entries timed in turn for
  `rounds` rounds of `iters` calls (medians over all rounds): comparisons within one run on a
  shared machine, where load drifts between measurements."""
  compiled = []
  for name, fn, args, flops_fn in entries:
    c = compile_fn(fn, args)
    f = compile_fn(flops_fn, args) if flops_fn else c
    for _ in range(warmup):
      jax.block_until_ready(c(*args))
    compiled.append((c, f))
  times: list[list[float]] = [[] for _ in entries]
  for _ in range(rounds):
    for k, (name, _, args, _) in enumerate(entries):
      for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled[k][0](*args))
        times[k].append(time.perf_counter() - start)
  return [Measurement(e[0], statistics.median(t), float(cost(f).get("flops", 0.0)), *memory(c))
          for e, t, (c, f) in zip(entries, times, compiled)]


def op_profile(fn: Callable, args: tuple, *, iters: int = 3, top: int = 15) -> str:
  """Where a compiled function's time goes: the JAX profiler's trace of `iters` calls, each
  XLA:CPU thunk's time summed by HLO op kind (convolution, dot, fusion kinds, copy, ...) and by
  instruction, as shares of the summed per-op time (a fusion is named by its heaviest op)."""
  compiled = compile_fn(fn, args)
  kinds = _instruction_kinds(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(iters):
        jax.block_until_ready(compiled(*args))
      wall = time.perf_counter() - start
    path = glob.glob(f"{log_dir}/**/perfetto_trace.json.gz", recursive=True)[0]
    events = json.load(gzip.open(path))["traceEvents"]
  by_op: dict[str, float] = {}
  for e in events:
    if e.get("ph") == "X" and e.get("name") in kinds:
      by_op[e["name"]] = by_op.get(e["name"], 0.0) + e["dur"] * 1e-6
  by_kind: dict[str, float] = {}
  for name, t in by_op.items():
    by_kind[kinds[name]] = by_kind.get(kinds[name], 0.0) + t
  if not by_op:
    return ("op profile: the trace has no per-op events (this backend's runtime records none; "
            "on XLA:CPU try XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true)")
  ops_total = sum(by_op.values())
  lines = [f"op profile: {iters} calls, {wall / iters * 1e3:.1f} ms/call wall, per-op events sum "
           f"to {ops_total / iters * 1e3:.1f} ms/call (2 threads may overlap ops)",
           f"{'op kind':56s} {'ms/call':>9s} {'share':>7s}"]
  for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    lines.append(f"{kind:56s} {t / iters * 1e3:9.1f} {100 * t / ops_total:6.1f}%")
  lines.append(f"{'top instructions (kind)':56s} {'ms/call':>9s} {'share':>7s}")
  for name, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f"{name[:30]:30s} {kinds[name][:25]:25s} {t / iters * 1e3:9.1f} "
                 f"{100 * t / ops_total:6.1f}%")
  return "\n".join(lines)


_HEAVY = ("convolution", "dot", "custom-call", "reduce-window", "reduce", "scatter", "gather",
          "sort", "transpose", "copy", "dynamic-update-slice", "concatenate")


def _instruction_kinds(hlo: str) -> dict[str, str]:
  """Instruction name -> op kind, from a compiled module's text; a fusion is named after the
  heaviest op it contains (`_HEAVY` order) and, for XNNPACK/YNNPACK/oneDNN fusions, its library."""
  computations: dict[str, list[tuple[str, str, str]]] = {}
  current = None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
    if head and line.rstrip().endswith("{"):
      current = computations.setdefault(head.group(1), [])
      continue
    op = re.match(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\(", line)
    if op and current is not None:
      current.append((op.group(1), op.group(2), line))
  kinds = {}
  for instructions in computations.values():
    for name, opcode, line in instructions:
      if opcode == "fusion":
        called = re.search(r"calls=%([^,\s]+)", line)
        inner = {o for _, o, _ in computations.get(called.group(1) if called else "", [])}
        heavy = next((h for h in _HEAVY if h in inner), "elementwise")
        library = re.search(r'"kind":"__(\w+?)_fusion"', line)
        opcode = f"fusion: {heavy}" + (f" ({library.group(1)})" if library else "")
      kinds[name] = opcode
  return kinds


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
