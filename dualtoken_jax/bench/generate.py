"""`python -m dualtoken_jax.bench generate`: image generation throughput, with and without
classifier-free guidance.

1. The demo MLLM (configs/demo_mllm_cpu.py: 64 px tokenizer, 8x8 = 64 image positions, D = 4
   per branch; random weights: speed does not depend on them), timed: the whole jitted
   sampling loop (`mllm.generation.sample_codes`) for `--images` images, then pixel decoding.
   Reports image positions/s and seconds per image, guided (batch 2B) and unguided (batch B).
2. A Gemma-2B-shaped MLLM with the paper's heads (configs/mllm_generation.py:llm=gemma_2b:
   SigLIP-L/16-256 tokenizer, 256 positions, D = 4, K = 16384, heads 2048 wide, 3 layers),
   compile only: peak memory of the sampling loop for one image with and without CFG, and
   XLA's FLOPs of one image position (LLM step + both heads over all depths).
"""

from __future__ import annotations

import argparse
import jax
import jax.numpy as jnp
import numpy as np

from dualtoken_jax import config_files

from dualtoken_jax.parallel import sharding
from dualtoken_jax.bench import timing
from dualtoken_jax.mllm import config as C
from dualtoken_jax.mllm import generation
from dualtoken_jax.mllm import model as M
from dualtoken_jax.mllm import state as S
from dualtoken_jax.training.state import state_layout

GIB = 2**30
PROMPT = 12  # caption tokens (template included) before <image_gen_start>


def _inputs(rows: int, vocab: int):
  prompt = jax.random.randint(jax.random.key(1), (rows, PROMPT), 3, vocab).astype(jnp.int32)
  return prompt, jnp.ones(prompt.shape, bool), jnp.ones(prompt.shape, jnp.int32)


def _sampler(modules, guided: bool):
  model = modules.model
  decoder = M.llm_module(modules.config.model)
  return lambda params, tok, prompt, mask, ar: generation.sample_codes(
      model, decoder, modules.tokenizer, params, tok, prompt, mask, ar, jax.random.key(0),
      guided=guided, cfg_scale=3.0, temperature=1.0, top_k=900, top_p=0.96)


def demo_rows(images: int, iters: int, guided_modes=(False, True), warmup: int = 2,
              spec: str = "demo_mllm_cpu") -> list[str]:
  config = config_files.load(spec)
  modules = S.Modules(config)
  mesh = sharding.single_device_mesh()
  state = modules.create(mesh, state_layout(modules, mesh).shardings)
  n = C.num_image_positions(config.model)
  label = "demo" if spec == "demo_mllm_cpu" else spec
  lines = [f"{label} MLLM (LLM width {config.model.llm.width} x {config.model.llm.depth} layers, "
           f"heads {C.head_width(config.model)} x {config.model.heads.num_layers} layers, "
           f"{n} positions x D=4+4 codes), {images} images per call:"]
  for guided in guided_modes:
    rows = 2 * images if guided else images
    sample = jax.jit(_sampler(modules, guided))
    args = (state.params, state.tokenizer, *_inputs(rows, config.model.llm.vocab_size))
    t = timing.median_time(sample, *args, warmup=warmup, iters=iters)
    decode = timing.median_time(lambda c: generation.decode_pixels(
        modules.tokenizer, state.tokenizer, c), sample(*args)[0], warmup=warmup, iters=iters)
    lines.append(f"  {'CFG (batch 2B)' if guided else 'no CFG (batch B)':17s} "
                 f"{images * n / t:8.0f} image positions/s  {t / images:7.3f} s/image "
                 f"(+ pixel decoding {decode / images:.3f} s/image)")
  return lines


def gemma_2b_rows() -> list[str]:
  config = config_files.load("mllm_generation:llm=gemma_2b")
  config.model.llm.scan_layers = False  # unrolled: XLA's cost analysis counts a scan body once
  modules = S.Modules(config)
  abstract, _ = modules.abstract_state()
  n = C.num_image_positions(config.model)
  heads = sum(np.prod(x.shape) for k, v in abstract.params.items() if k.startswith("gen_")
              for x in jax.tree.leaves(v))
  lines = [f"gemma_2b-shaped MLLM + paper heads ({heads / 2e6:.0f}M params per head, "
           f"{n} positions), 1 image, compile only:"]
  for guided in (False, True):  # peak includes the fp32 weights (arguments)
    rows = 2 if guided else 1
    compiled = jax.jit(_sampler(modules, guided)).lower(
        abstract.params, abstract.tokenizer, *_inputs(rows, config.model.llm.vocab_size)).compile()
    flops = float(timing.cost(compiled).get("flops", 0.0))
    lines.append(f"  {'CFG' if guided else 'no CFG':7s} peak {timing.memory(compiled)[0] / GIB:6.2f}"
                 f" GiB   ~{flops / 1e9:8.1f} GFLOP per image position (loop body)")
  return lines


def run(argv: list[str]) -> str:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.bench generate")
  p.add_argument("--images", type=int, default=4)
  timing.add_timing_flags(p, iters=3)
  p.add_argument("--config", default="demo_mllm_cpu",
                 help="the timed MLLM config (e.g. demo_mllm_cpu:test, its 32 px variant)")
  p.add_argument("--skip_2b", action="store_true", help="only the demo-model timing")
  p.add_argument("--cfg", choices=("both", "off", "on"), default="both",
                 help="time the demo model without and/or with classifier-free guidance")
  a = p.parse_args(argv)
  lines = demo_rows(a.images, a.iters, {"both": (False, True), "off": (False,), "on": (True,)}[a.cfg],
                    a.warmup, a.config)
  if not a.skip_2b:
    lines += gemma_2b_rows()
  lines.append(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
  return "\n".join(lines)
