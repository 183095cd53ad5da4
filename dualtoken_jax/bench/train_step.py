"""`python -m dualtoken_jax.bench train_step --config … --batch B`: one tokenizer training step.

Median step time after warm-up, FLOPs per step from XLA's cost analysis (of the loop-free
variant: chunked distances and scanned blocks unrolled), achieved GFLOP/s and its fraction of a
plain matmul in the same run; with and without the LPIPS + GAN terms (random LPIPS weights:
the cost does not depend on their values).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from dualtoken_jax import config_files, data

from dualtoken_jax.parallel import sharding
from dualtoken_jax.bench import timing
from dualtoken_jax.models import lpips as lpips_model
from dualtoken_jax.tokenizer_training import recipe
from dualtoken_jax.tokenizer_training import state as S
from dualtoken_jax.tokenizer_training.step import make_train_step
from dualtoken_jax.training.state import state_layout


def training_config(spec: str, batch: int):
  config = config_files.load(spec)
  if "optimizer" not in config:  # a model-only config: wrap it in the stage-1 recipe
    config = recipe.training_config(config_files.model_of(config), stage=1)
  config.batch_size = batch
  config.gan.start_step = 0
  return config


def loop_free(config):
  """Same computation without the chunked-distance loop (XLA counts a loop body once). Keep
  `scan_layers=False` in configs whose FLOPs you report."""
  c = config.copy_and_resolve_references()
  for q in (c.model.vq_pix, c.model.vq_sem):
    q.distance_chunk = q.codebook_size
  return c


def build(config, with_extras: bool, mesh):
  """(step function, state layout, batch sharding, modules) on `mesh`."""
  modules = S.Modules(config)
  layout = state_layout(modules, mesh)
  lpips = None
  if with_extras:
    params = jax.jit(lpips_model.LPIPS().init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                               jnp.zeros((1, 32, 32, 3)))["params"]
    lpips = lpips_model.lpips_fn(params)
  step = make_train_step(modules, lpips, with_gan=with_extras and config.gan.enabled)
  return step, layout, data.batch_sharding(mesh), modules


def run(argv: list[str]) -> str:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.bench train_step")
  p.add_argument("--config", action="append", help="config spec(s); default: demo + ViT-B/16")
  p.add_argument("--batch", type=int, default=4)
  timing.add_timing_flags(p, iters=20)
  p.add_argument("--lpips_gan", choices=("both", "off", "on"), default="both",
                 help="time the step without and/or with the LPIPS + GAN terms")
  p.add_argument("--no_flop_count", action="store_true",
                 help="skip compiling the loop-free variant (FLOPs then count a loop body once)")
  p.add_argument("--devices", type=int, default=0,
                 help="shard the step over the first N devices (default 0: all of them)")
  p.add_argument("--conv_impls", default="",
                 help="comma-separated model.conv_impl values timed side by side, alternated "
                      "round by round (default: the config's)")
  p.add_argument("--rounds", type=int, default=1,
                 help="alternation rounds of --iters calls per variant (medians over all)")
  p.add_argument("--profile", action="store_true",
                 help="also print where each step's time goes by HLO op kind (JAX profiler)")
  a = p.parse_args(argv)
  mesh = sharding.make_mesh({"fsdp": -1}, jax.devices()[:a.devices] if a.devices else None)
  entries, profiles = [], []
  for spec in a.config or ["configs/demo_cpu.py", "dualtoken_b16"]:
    config = training_config(spec, a.batch)
    size = config.model.image_size
    images = jax.random.uniform(jax.random.key(1), (a.batch, size, size, 3), minval=-1, maxval=1)
    for impl in a.conv_impls.split(",") if a.conv_impls else [None]:
      if impl is not None:
        config.model.conv_impl = impl
      conv = f" conv={impl}" if impl else ""
      for extras in {"both": (False, True), "off": (False,), "on": (True,)}[a.lpips_gan]:
        step, layout, batch, modules = build(config, extras, mesh)
        shardings = layout.shardings
        state = modules.create(mesh, shardings)
        counted = None if a.no_flop_count else build(loop_free(config), extras, mesh)[0]
        jit = lambda f: jax.jit(f, in_shardings=(shardings, batch), out_shardings=(shardings, None))
        name = (f"train {spec.split('/')[-1]} B={a.batch} "
                f"{'+LPIPS+GAN' if extras else 'no LPIPS/GAN'}{conv}")
        args = (state, jax.device_put(images, batch))
        compiled = timing.compile_fn(jit(step), args)  # once, for the timing and the profile
        entries.append((name, compiled, args, counted and jit(counted)))
        if a.profile:
          profiles.append(f"{name}\n{timing.op_profile(compiled, args)}")
  rows = timing.measure_alternated(entries, rounds=a.rounds, iters=a.iters, warmup=a.warmup)
  return "\n\n".join([timing.table(rows, timing.matmul_baseline(iters=a.iters, warmup=a.warmup)),
                      *profiles])
