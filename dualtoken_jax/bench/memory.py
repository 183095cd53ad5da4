"""`python -m dualtoken_jax.bench memory --config … --batch_per_device 32 --fsdp 8`: XLA's
compiled per-device memory of one training step on a simulated mesh (compile only, nothing runs).

Run it as its own process: it asks XLA for `--devices` simulated CPU devices before jax starts.
Default: the So400m/14-384 stage-1 step (LPIPS + GAN on) under fsdp=8 with the blocks scanned and
rematerialised, the decoder and LPIPS rematerialised, bf16 compute and fp32 master weights.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from dualtoken_jax import sharding
from dualtoken_jax.bench import train_step as T
from dualtoken_jax.training import state as S


def run(argv: list[str]) -> str:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.bench memory")
  p.add_argument("--config", default="dualtoken_so400m:res=384")
  p.add_argument("--batch_per_device", type=int, default=32)
  p.add_argument("--fsdp", type=int, default=8)
  p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (set before jax starts)")
  p.add_argument("--no_remat", action="store_true", help="keep every activation (no rematerialisation)")
  a = p.parse_args(argv)
  mesh = sharding.make_mesh({"fsdp": a.fsdp, "data": -1})
  config = T.training_config(a.config, a.batch_per_device * mesh.size)
  config.model.dtype = "bfloat16"
  if not a.no_remat:
    config.model.scan_layers, config.model.remat_policy = True, "full"
    config.model.decoder.remat = True
    config.loss.lpips_remat = True
  size = config.model.image_size
  step, shardings, batch, modules = T.build(config, True, mesh)
  abstract, _ = S.abstract_state(modules, (1, size, size, 3))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  images = jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32, sharding=batch)
  compiled = jax.jit(step, in_shardings=(shardings, batch), out_shardings=(shardings, None),
                     donate_argnums=0).lower(state, images).compile()
  m = compiled.memory_analysis()
  gib = lambda b: b / 2**30
  params = S.tree_nbytes(abstract.params) + S.tree_nbytes(abstract.teacher)
  lines = [
      f"{a.config} stage {config.stage}: {config.batch_size} images ({a.batch_per_device}/device) "
      f"at {size} px on mesh {dict(mesh.shape)}, bf16 compute, fp32 weights, "
      f"{'remat on' if not a.no_remat else 'no remat'}",
      f"  model+teacher params {gib(params):.2f} GiB in total (fp32), optimiser state "
      f"{gib(S.tree_nbytes(abstract.opt_state)):.2f} GiB, sharded over fsdp={a.fsdp}",
      f"  per device: arguments {gib(m.argument_size_in_bytes):.2f} GiB, outputs "
      f"{gib(m.output_size_in_bytes):.2f} GiB (aliased {gib(m.alias_size_in_bytes):.2f}), "
      f"temporaries {gib(m.temp_size_in_bytes):.2f} GiB",
      f"  peak per device ~ {gib(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes):.2f} GiB"]
  return "\n".join(lines)
