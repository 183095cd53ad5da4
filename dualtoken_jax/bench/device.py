"""`python -m dualtoken_jax.bench device`: the accelerator check, one command, under 8 minutes.

Prepared so that whenever a GPU or TPU is at hand it runs at once; on one device:
  1. attention at the So400m-384 shape (729 tokens, 16 heads of 72, bf16), forward + backward,
     every `attention_impl` the backend can run (chunked, xla; + cudnn on GPU, + pallas_tpu on
     TPU), each against "chunked" (max |difference| of the outputs, and the time ratio);
  2. the nearest-code search at paper scale (K=16384, d=32, N = 32 x 729): the fused Pallas
     kernel (GPU/TPU) vs the chunked XLA argmin, identical indices checked;
  3. the stage-1 train step (no LPIPS/GAN unless `--lpips_gan`) in bf16 of ViT-B/16-224
     (`configs/dualtoken_b16.py`, batch 64) and So400m/14-384 (`configs/dualtoken_so400m.py`,
     the paper recipe's remat settings, batch 32), one row per attention implementation, with
     FLOPs from XLA's cost analysis of the loop-free step (counted once per model: the model's
     FLOPs do not depend on the attention kernel) and MFU against the chip's bf16 peak.
Sections stop being started once `--budget_s` (default 420 s) is spent; what was skipped is
printed. `--smoke`: tiny shapes (the same code paths), for CPU tests.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dualtoken_jax.bench import timing
from dualtoken_jax.bench import train_step as T
from dualtoken_jax.models import attention as A
from dualtoken_jax.parallel import sharding
from dualtoken_jax.quantization import pallas_nearest as PN
from dualtoken_jax.quantization import residual as rvq

FULL = dict(attn=(8, 729, 16, 72), nearest=(32 * 729, 16384, 32),
            steps=(("dualtoken_b16", 64), ("dualtoken_so400m", 32)))
SMOKE = dict(attn=(1, 20, 2, 8), nearest=(64, 256, 8), steps=(("demo_cpu:test", 2),))


def impls_here() -> list[str]:
  backend = jax.default_backend()
  return (["chunked", "xla"] + (["cudnn"] if backend == "gpu" else [])
          + (["pallas_tpu"] if backend == "tpu" else []))


def plan(a) -> list[tuple[str, object]]:
  """The sections this run will time, in order: ("attention", shape), ("nearest", shape),
  ("train_step", (config spec, batch)) per model."""
  shapes = SMOKE if a.smoke else FULL
  steps = [s for s in shapes["steps"] if not a.models or any(m in s[0] for m in a.models)]
  return ([("attention", shapes["attn"]), ("nearest", shapes["nearest"])]
          + [("train_step", s) for s in steps])


def attention_rows(shape, iters, warmup) -> list[str]:
  b, t, n, h = shape
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v, w = (jax.random.normal(key, (b, t, n, h), jnp.bfloat16) for key in ks)
  base, lines = None, []
  for impl in impls_here():
    f = jax.jit(jax.value_and_grad(
        lambda q, k, v, impl=impl: jnp.sum((A.attend(q, k, v, impl=impl) * w).astype(jnp.float32))))
    out = A.attend(q, k, v, impl=impl)
    ms = timing.median_time(f, q, k, v, warmup=warmup, iters=iters) * 1e3
    if base is None:
      base = (out, ms)
    diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - base[0].astype(jnp.float32))))
    lines.append(f"attention {impl:10s} B={b} T={t} heads={n}x{h} bf16 fwd+bwd {ms:9.2f} ms  "
                 f"x{base[1] / ms:5.2f} vs chunked  max|diff| {diff:.2e}")
  return lines


def nearest_rows(shape, iters, warmup) -> list[str]:
  n, k, d = shape
  x = jax.random.normal(jax.random.key(1), (n, d))
  codebook = jax.random.normal(jax.random.key(2), (k, d))
  xla = jax.jit(lambda x, c: rvq.nearest_code(x, c, 2048))
  ref = np.asarray(xla(x, codebook))
  ms = timing.median_time(xla, x, codebook, warmup=warmup, iters=iters) * 1e3
  lines = [f"nearest code XLA (chunks of 2048) N={n} K={k} d={d} {ms:9.2f} ms"]
  if jax.default_backend() not in PN.ACCELERATORS:
    return lines + ["nearest code Pallas: skipped (needs a GPU or TPU)"]
  fused = jax.jit(lambda x, c: PN.search(x, c, impl="pallas"))
  same = bool(np.array_equal(np.asarray(fused(x, codebook)), ref))
  ms_p = timing.median_time(fused, x, codebook, warmup=warmup, iters=iters) * 1e3
  return lines + [f"nearest code Pallas (fused) N={n} K={k} d={d} {ms_p:9.2f} ms  "
                  f"x{ms / ms_p:5.2f} vs XLA  identical indices: {same}"]


def train_rows(spec, batch, a, mesh) -> list[timing.Measurement]:
  base = T.training_config(spec, batch)
  base.model.dtype = "bfloat16"
  size = base.model.image_size
  images = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1, maxval=1)
  flops, rows = None, []
  for impl in impls_here():
    config = base.copy_and_resolve_references()
    config.model.attention_impl = impl
    step, layout, batch_sharding, modules = T.build(config, a.lpips_gan, mesh)
    shardings = layout.shardings
    jit = lambda f: jax.jit(f, in_shardings=(shardings, batch_sharding),
                            out_shardings=(shardings, None))
    state = modules.create(mesh, shardings)
    args = (state, jax.device_put(images, batch_sharding))
    counted = None
    if flops is None:  # loop-free: unscanned blocks, one distance chunk (XLA counts loops once)
      loop_free = T.loop_free(config)
      loop_free.model.scan_layers = False
      counted = jit(T.build(loop_free, a.lpips_gan, mesh)[0])
    m = timing.measure(f"{spec.split('/')[-1]} {impl} bf16 B={batch}", jit(step), args,
                       flops_fn=counted, iters=a.iters, warmup=a.warmup)
    flops = m.flops if flops is None else flops
    m.flops = flops
    rows.append(m)
    del state, args
  return rows


def run(argv: list[str]) -> str:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.bench device")
  p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU tests)")
  p.add_argument("--budget_s", type=float, default=420.0,
                 help="start no new section after this many seconds (default 420)")
  p.add_argument("--models", nargs="*", default=None,
                 help="substrings of the train-step configs to run (default: b16 and so400m)")
  p.add_argument("--lpips_gan", action="store_true", help="time the step with LPIPS + GAN")
  p.add_argument("--plan", action="store_true", help="print the sections and exit")
  timing.add_timing_flags(p, iters=5, warmup=2)
  a = p.parse_args(argv)
  sections = plan(a)
  lines = [f"device: {jax.devices()[0].device_kind}, backend {jax.default_backend()}, "
           f"attention impls {impls_here()}"]
  if a.plan:
    return "\n".join(lines + [f"plan: {name} {arg}" for name, arg in sections])
  start, steps = time.perf_counter(), []
  mesh = sharding.make_mesh({"fsdp": -1}, jax.devices()[:1])
  for name, arg in sections:
    if time.perf_counter() - start > a.budget_s:
      lines.append(f"skipped (over --budget_s {a.budget_s:.0f}): {name} {arg}")
      continue
    if name == "attention":
      lines += attention_rows(arg, a.iters, a.warmup)
    elif name == "nearest":
      lines += nearest_rows(arg, a.iters, a.warmup)
    else:
      steps += train_rows(*arg, a, mesh)
  if steps:
    lines.append(timing.table(steps, timing.matmul_baseline(iters=a.iters, warmup=a.warmup)))
  lines.append(f"total {time.perf_counter() - start:.0f} s")
  return "\n".join(lines)
