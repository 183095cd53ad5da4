"""`python -m dualtoken_jax.bench encode`: tokenizer encode (images -> codes) and decode
(pixel codes -> images) for the tiny and a ViT-B/16-224-sized config."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import ml_collections

from dualtoken_jax import config_files
from dualtoken_jax.bench import timing
from dualtoken_jax.models.dualtoken import DualToken, init_variables


def run(argv: list[str]) -> str:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.bench encode")
  p.add_argument("--configs", default="dualtoken_tiny,dualtoken_b16")
  p.add_argument("--batch", type=int, default=8)
  timing.add_timing_flags(p, iters=20)
  p.add_argument("--no_flop_count", action="store_true",
                 help="skip compiling the loop-free encoder (FLOPs then count a loop body once)")
  a = p.parse_args(argv)
  rows = []
  for name in a.configs.split(","):
    config = config_files.model_of(config_files.load(name))
    model = DualToken(ml_collections.FrozenConfigDict(config))
    loop_free = config.copy_and_resolve_references()  # for XLA's FLOP count (see timing.measure)
    for q in (loop_free.vq_pix, loop_free.vq_sem):
      q.distance_chunk = q.codebook_size
    counted = DualToken(ml_collections.FrozenConfigDict(loop_free))
    # One jitted init: op-by-op initialisation compiles every random op separately.
    variables = jax.jit(lambda rng, c=config: init_variables(c, rng))(jax.random.key(0))
    size = config.image_size
    images = jax.random.uniform(jax.random.key(1), (a.batch, size, size, 3), minval=-1, maxval=1)
    encode = lambda m: (lambda v, x: m.apply(v, x, method=DualToken.encode))
    codes = jax.jit(encode(model))(variables, images)["codes_pix"]
    decode = lambda m: (lambda v, c: m.apply(v, c, method=DualToken.decode_codes))
    tag = f"{name} {size}px B={a.batch}"
    rows.append(timing.measure(f"encode {tag}", encode(model), (variables, images),
                               flops_fn=None if a.no_flop_count else encode(counted),
                               iters=a.iters, warmup=a.warmup))
    rows.append(timing.measure(f"decode {tag}", decode(model), (variables, codes), iters=a.iters,
                               warmup=a.warmup))
  return timing.table(rows, timing.matmul_baseline(iters=a.iters, warmup=a.warmup))
