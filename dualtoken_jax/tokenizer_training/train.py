"""`train_and_evaluate(config, workdir)`: the tokenizer training run, resumable and sharded.

Sections: mesh -> input -> state (fresh or restored) -> compiled steps -> loop (log, evaluate,
checkpoint, stop on SIGTERM) -> final checkpoint and report. Re-running on the same workdir
resumes from its newest complete checkpoint, bit-exactly on the same machine.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import parameter_overview

from dualtoken_jax import data

from dualtoken_jax.models import config as model_config

from dualtoken_jax.parallel import distributed
from dualtoken_jax.parallel import sharding
from dualtoken_jax.metrics import image_quality
from dualtoken_jax.bridges import lpips as lpips_weights
from dualtoken_jax.models import lpips as lpips_model
from dualtoken_jax.data.images import side_by_side, to_uint8, to_unit
from dualtoken_jax.tokenizer_training import inputs
from dualtoken_jax.tokenizer_training import recipe
from dualtoken_jax.training import checkpoints
from dualtoken_jax.training import perf
from dualtoken_jax.training import state as T
from dualtoken_jax.training.loop import NonFiniteLossError, run_training_loop
from dualtoken_jax.tokenizer_training import state as S
from dualtoken_jax.training.metrics_log import MetricLogger
from dualtoken_jax.tokenizer_training.step import make_train_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains the tokenizer `config` describes, writing everything under `workdir`.

  Returns the last evaluation's metrics ({"step", "psnr", ...}).
  """
  workdir = Path(workdir)
  recipe.validate(config)  # ConfigError naming the field, before anything is built
  distributed.initialize(config.distributed)  # the launcher's environment, or auto-detection
  mesh = sharding.make_mesh(config.mesh)
  logger = MetricLogger(workdir)
  logging.info("%s; mesh %s; %d process(es)", model_config.describe(config.model),
               dict(mesh.shape), jax.process_count())

  # ---------------------------------------------------------------- input
  size = config.model.image_size
  per_host = data.host_batch_size(config.batch_size, mesh)
  train_iter = inputs.train_iterator(config, per_host)
  eval_images = inputs.eval_images(config.eval, size)
  batch_sharding = data.batch_sharding(mesh)

  # ---------------------------------------------------------------- state
  modules = S.Modules(config)
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", **config.checkpoint)
  state, layout, start = T.setup_state(modules, mesh, ckpt, train_iter)
  shardings = layout.shardings
  if start == 0:
    logger.text("parameter_overview", parameter_overview.get_parameter_overview(state.params))
  else:
    logging.info("resumed from step %d", start)

  # ---------------------------------------------------------------- steps
  lpips = _lpips(config)
  step_fns = {}
  def step_fn(with_gan: bool):
    if with_gan not in step_fns:
      step_fns[with_gan] = jax.jit(make_train_step(modules, lpips, with_gan),
                                   in_shardings=(shardings, batch_sharding),
                                   out_shardings=(shardings, None), donate_argnums=0)
    return step_fns[with_gan]
  reconstruct = jax.jit(lambda params, stats, x: modules.model.apply(
      {"params": params, "vq_stats": stats}, x)["recon"])

  # ---------------------------------------------------------------- loop
  uses_gan = lambda step: config.gan.enabled and step >= config.gan.start_step and config.loss.pixel

  key_log = _KeyLog(workdir) if config.data.get("log_keys") else None

  def train_step(state, step, batch):
    if key_log is not None:
      key_log.write(step, batch["key"])
    return step_fn(uses_gan(step))(state, data.make_global_array(batch["image"], mesh))

  flops = {}
  def step_flops(state, step, batch):  # per device, from the compiled step (training/perf.py)
    gan = uses_gan(step)
    if gan not in flops:
      flops[gan] = perf.step_flops(step_fn(gan), state,
                                   data.global_array_spec(batch["image"], mesh))
    return flops[gan]

  _, last_eval = run_training_loop(
      state, config=config, start=start, train_iter=train_iter, train_step=train_step,
      step_flops=step_flops,
      run_eval=lambda state, step: evaluate(reconstruct, state, eval_images, step, logger),
      ckpt=ckpt, logger=logger)
  return last_eval


def evaluate(reconstruct, state, eval_images: np.ndarray, step: int, logger: MetricLogger) -> dict:
  """PSNR/SSIM of the fixed evaluation images and a [input | reconstruction] grid PNG."""
  recon = np.asarray(reconstruct(state.params, state.vq_stats, jnp.asarray(eval_images)))
  x, y = to_unit(eval_images), to_unit(recon)
  psnr = np.asarray(image_quality.psnr(y, x))
  ssim = np.asarray(image_quality.ssim(y, x))
  result = {"step": step, "psnr": float(psnr.mean()), "ssim": float(ssim.mean())}
  logger.scalars(step, {"eval/psnr": result["psnr"], "eval/ssim": result["ssim"]})
  captions = [f"step {step}  {p:.1f} dB" for p in psnr]
  grid = side_by_side(to_uint8(eval_images), to_uint8(recon), captions, columns=4)
  result["grid"] = str(logger.image(step, "reconstructions", np.asarray(grid)))
  logging.info("step %d: eval PSNR %.2f dB, SSIM %.3f", step, result["psnr"], result["ssim"])
  return result


class _KeyLog:
  """`config.data.log_keys`: the record keys this process trains on, one JSON line per step."""

  def __init__(self, workdir: Path):
    self._path = workdir / "data_keys" / f"process_{jax.process_index()}.jsonl"
    self._path.parent.mkdir(parents=True, exist_ok=True)

  def write(self, step: int, keys) -> None:
    with self._path.open("a") as f:
      f.write(json.dumps({"step": int(step), "keys": [str(k) for k in keys]}) + "\n")


def _lpips(config):
  path = config.loss.lpips_weights
  if not config.loss.pixel or config.loss.lpips == 0:
    return None
  if not path:
    logging.warning("no LPIPS weights configured (config.loss.lpips_weights): training WITHOUT "
                    "the LPIPS term. Convert them with `python -m dualtoken_jax.convert_lpips`.")
    return None
  return lpips_model.lpips_fn(lpips_weights.load(path))




__all__ = ["NonFiniteLossError", "evaluate", "train_and_evaluate"]
