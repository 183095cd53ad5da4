"""`python -m dualtoken_jax.bench quantizer`: the residual quantizer at paper scale.

K=16384, d=32, D=8 on N = 8 x 729 vectors (a batch of 8 at 384 px): eval-mode encoding, and
training-mode passes with the pixel branch's per-level EMA and the semantic branch's pooled EMA.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from dualtoken_jax.bench import timing
from dualtoken_jax.quantization.quantizer import ResidualQuantizer


def run(argv: list[str]) -> str:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.bench quantizer")
  p.add_argument("--codebook_size", type=int, default=16384)
  p.add_argument("--dim", type=int, default=32)
  p.add_argument("--depth", type=int, default=8)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--tokens", type=int, default=729)
  p.add_argument("--chunk", type=int, default=2048)
  timing.add_timing_flags(p, iters=20)
  a = p.parse_args(argv)

  z = jax.random.normal(jax.random.key(0), (a.batch * a.tokens, a.dim), jnp.float32)
  rows = []
  for mode, train in (("eval", False), ("per_level", True), ("pooled", True)):
    make = lambda chunk, m=mode: ResidualQuantizer(
        codebook_size=a.codebook_size, embed_dim=a.dim, depth=a.depth, distance_chunk=chunk,
        ema_update="pooled" if m == "pooled" else "per_level")
    stats = make(a.chunk).init(jax.random.key(1), z)
    def step(stats, z, chunk=a.chunk, train=train):
      out, new = make(chunk).apply(stats, z, train=train, mutable=["vq_stats"],
                                   rngs={"vq": jax.random.key(2)})
      return out.codes, out.quantized, new
    unchunked = lambda stats, z, step=step: step(stats, z, chunk=a.codebook_size)
    name = f"RVQ {mode} K={a.codebook_size} d={a.dim} D={a.depth} N={z.shape[0]}"
    rows.append(timing.measure(name, step, (stats, z), flops_fn=unchunked, iters=a.iters,
                               warmup=a.warmup))
  return timing.table(rows, timing.matmul_baseline(iters=a.iters, warmup=a.warmup))
