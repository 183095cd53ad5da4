"""`python -m dualtoken_jax.bench evaluate`: images/s of the evaluation's device work per batch.

Times the jitted functions `python -m dualtoken_jax.evaluate` runs for rFID/PSNR/SSIM/usage
(`evaluation/steps.py`), on random weights of the same shapes (no init compile, no files):

  recon   the main step: encode + decode, PSNR, SSIM, code histograms;
  rfid    Inception-v3 pool3 features of both sides at 299×299 (bilinear resize in the step);
  total   both together, i.e. one evaluation batch without data loading.

Images/s = batch / median time of `total`. Configs default to the tiny and the ViT-B/16-224
ones; host work (decoding JPEGs, accumulating statistics) is not included.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from dualtoken_jax import config_files, data
from dualtoken_jax.bench import timing
from dualtoken_jax.bridges import layout
from dualtoken_jax.data.images import to_unit
from dualtoken_jax.evaluation import steps
from dualtoken_jax.models import inception
from dualtoken_jax.models.dualtoken import abstract_variables
from dualtoken_jax.parallel import sharding


def random_like(abstract, seed: int = 0):
  """Host-drawn stand-in weights: N(0, 1/fan_in) kernels, unit scales, zero biases."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in layout.flatten(abstract).items():
    name = path.rsplit("/", 1)[-1]
    if name in ("scale", "var", "cluster_size"):
      value = np.ones(leaf.shape)
    elif name in ("bias", "mean") or name.endswith("_bias"):
      value = np.zeros(leaf.shape)
    elif name == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(max(1, np.prod(leaf.shape[:-1])))
    else:
      value = rng.normal(size=leaf.shape) * 0.5
    out[path] = jnp.asarray(value, leaf.dtype)
  return layout.unflatten(out)


def run(argv: list[str]) -> str:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.bench evaluate")
  p.add_argument("--configs", default="dualtoken_tiny,dualtoken_b16")
  p.add_argument("--batch", type=int, default=8, help="global batch (a multiple of the devices)")
  timing.add_timing_flags(p, iters=5)
  p.add_argument("--devices", type=int, default=0,
                 help="the data-parallel mesh over the first N devices (default 0: all of them)")
  p.add_argument("--fid_resize", default="bilinear", choices=steps.FID_RESIZE)
  a = p.parse_args(argv)
  mesh = sharding.make_mesh({"data": -1}, jax.devices()[:a.devices] if a.devices else None)
  net = inception.FIDInceptionV3(resize_input=a.fid_resize == "bilinear")
  inc_vars = steps.replicate(random_like(jax.eval_shape(
      net.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)), 1), mesh)
  features = steps.features_step(a.fid_resize, mesh)
  eight_bit = steps.eight_bit_step(mesh)
  rows, speeds = [], []
  for name in a.configs.split(","):
    config = config_files.model_of(config_files.load(name))
    model = steps.canonical_model(config)
    step = steps.main_step(model, steps.StepSpec(recon=True, ssim=True, usage=True), mesh)
    tok_vars = steps.replicate(random_like(abstract_variables(config)), mesh)
    size = config.image_size
    images = data.make_global_array(np.asarray(jax.random.uniform(
        jax.random.key(1), (a.batch, size, size, 3), minval=-1, maxval=1)), mesh)
    mask = data.make_global_array(np.ones((a.batch,), bool), mesh)

    def recon(v, x, m, step=step):
      return step(v, None, x, m)

    def rfid(v, x):  # two different inputs, as input and reconstruction are
      return features(v, to_unit(x)), features(v, to_unit(-x))

    def total(tv, iv, x, m, step=step):
      out = step(tv, None, x, m)
      real, fake = eight_bit(x, out["recon"])
      return out["psnr"], out["ssim"], out["hist_pix"], features(iv, real), features(iv, fake)

    tag = f"{name} {size}px B={a.batch}"
    timed = dict(iters=a.iters, warmup=a.warmup)
    rows.append(timing.measure(f"recon {tag}", recon, (tok_vars, images, mask), **timed))
    rows.append(timing.measure(f"rfid features x2 {tag}", rfid, (inc_vars, images), **timed))
    rows.append(timing.measure(f"total {tag}", total, (tok_vars, inc_vars, images, mask),
                               **timed))
    speeds.append(f"{name}: {a.batch / rows[-1].median_s:.2f} images/s "
                  f"(recon + rFID features, {a.fid_resize} resize)")
  return (timing.table(rows, timing.matmul_baseline(iters=a.iters, warmup=a.warmup)) + "\n"
          + "\n".join(speeds))
