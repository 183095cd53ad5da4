"""`python -m dualtoken_jax.bench memory --config … --batch_per_device 32 --fsdp 8`: XLA's
compiled per-device memory of one training step on a simulated mesh (compile only, nothing runs).

Run it as its own process: it asks XLA for `--devices` simulated CPU devices before jax starts.
Default: the So400m/14-384 stage-1 step (LPIPS + GAN on) with the config's own memory settings
(`recipe.paper_recipe`: bf16 compute, fp32 master weights, scanned and rematerialised blocks,
rematerialised projections and decoder, attention in query blocks, decoder/LPIPS/D in batch
chunks); `--no_remat` turns off everything that recomputes activations.

The CPU compiler is a stand-in for the TPU's and differs in two ways that matter here:
* it drops `jax.checkpoint`'s optimisation barriers before CSE and scheduling, which merges every
  recomputation back into the forward pass — remat outside a loop then saves nothing. The GPU
  and TPU pipelines keep the barriers until after scheduling, so `python -m dualtoken_jax.bench
  memory` runs with `--xla_disable_hlo_passes=cse_barrier_expander` (set in `__main__`);
* it computes bf16 ops in float32 (converted copies of bf16 buffers) and expands max-pool
  gradients into index arrays, so its figures overstate a TPU's rather than understate them.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from dualtoken_jax.parallel import sharding
from dualtoken_jax.bench import train_step as T
from dualtoken_jax.training.state import tree_nbytes


def disable_remat(config) -> None:
  """Everything that trades recomputation for memory, off (query blocks rematerialise too)."""
  config.model.remat_policy = "none"
  config.model.decoder.remat = False
  config.model.attention_chunk = 0


def describe(config) -> str:
  m = config.model
  if m.remat_policy == "none" and not m.decoder.remat and not m.attention_chunk:
    remat = "no remat"
  else:
    remat = (f"remat: blocks/projections {m.remat_policy}, decoder {'on' if m.decoder.remat else 'off'}, "
             f"attention in blocks of {m.attention_chunk or 'all'} queries")
  chunk = config.loss.pixel_chunk
  return f"{remat}, decoder/LPIPS/D on {chunk or 'all'} images per device at a time"


def run(argv: list[str]) -> str:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.bench memory")
  p.add_argument("--config", default="dualtoken_so400m:res=384")
  p.add_argument("--batch_per_device", type=int, default=32)
  p.add_argument("--fsdp", type=int, default=8)
  p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (set before jax starts)")
  p.add_argument("--no_lpips_gan", action="store_true",
                 help="the step without the LPIPS + GAN terms (default: with, as the recipe)")
  p.add_argument("--no_remat", action="store_true",
                 help="keep every activation: no remat anywhere, attention not in query blocks")
  a = p.parse_args(argv)
  mesh = sharding.make_mesh({"fsdp": a.fsdp, "data": -1})
  config = T.training_config(a.config, a.batch_per_device * mesh.size)
  config.model.dtype = "bfloat16"
  if a.no_remat:
    disable_remat(config)
  size = config.model.image_size
  step, layout, batch, _ = T.build(config, not a.no_lpips_gan, mesh)
  shardings, abstract, state = layout.shardings, layout.abstract, layout.targets()
  images = jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32, sharding=batch)
  compiled = jax.jit(step, in_shardings=(shardings, batch), out_shardings=(shardings, None),
                     donate_argnums=0).lower(state, images).compile()
  m = compiled.memory_analysis()
  gib = lambda b: b / 2**30
  params = tree_nbytes(abstract.params) + tree_nbytes(abstract.teacher)
  lines = [
      f"{a.config} stage {config.stage}: {config.batch_size} images ({a.batch_per_device}/device) "
      f"at {size} px on mesh {dict(mesh.shape)}, bf16 compute, fp32 weights",
      f"  {describe(config)}",
      f"  model+teacher params {gib(params):.2f} GiB in total (fp32), optimiser state "
      f"{gib(tree_nbytes(abstract.opt_state)):.2f} GiB, sharded over fsdp={a.fsdp}",
      f"  per device: arguments {gib(m.argument_size_in_bytes):.2f} GiB, outputs "
      f"{gib(m.output_size_in_bytes):.2f} GiB (aliased {gib(m.alias_size_in_bytes):.2f}), "
      f"temporaries {gib(m.temp_size_in_bytes):.2f} GiB",
      f"  peak per device ~ {gib(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes):.2f} GiB"]
  return "\n".join(lines)
