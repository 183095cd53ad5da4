"""`python -m dualtoken_jax.bench decode`: KV-cached decoding vs recomputing the prefix, and the
compiled per-device memory of a Gemma-2B-shaped MLLM SFT step on a simulated mesh.

1. Tiny decoder (configs/mllm_tiny.py's), timed: greedy generation of `--new` tokens after a
   `--prompt`-token prompt, (a) with the KV cache (`llm.decoding.generate`: one prefill, then
   one cached step per token) and (b) without (every token re-runs the full forward over a
   fixed (prompt + new)-token buffer), both jitted whole loops. Both must give the same tokens.
2. Gemma-2B-shaped decoder (`gemma_2b`: 2048 wide, 18 layers, MQA, 256k vocab), compile only:
   XLA's FLOPs and memory of one cached step vs one recompute step at the same length, and the
   memory of the whole cached generation loop.
3. Gemma-2B-shaped MLLM SFT step (configs/mllm_sft.py:llm=gemma_2b: SigLIP-L/16-256 DualToken
   tokenizer run frozen in the step, 256 image positions, bf16 compute, fp32 weights, scanned
   and rematerialised layers) under fsdp=`--fsdp`, compile only: per-device memory.
   `--sft_llm` picks another decoder variant (the paper's `qwen2.5_3b`, `qwen2.5_7b`, ...),
   `--sft_stage=generation` the generation-head stage, `--sft_only` skips parts 1 and 2.

Run as its own process (the simulated devices are requested before jax starts).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from dualtoken_jax import config_files, data

from dualtoken_jax.parallel import sharding
from dualtoken_jax.bench import timing
from dualtoken_jax.llm import config as llm_config
from dualtoken_jax.llm import decoding, masks
from dualtoken_jax.llm import sharding as llm_sharding
from dualtoken_jax.llm.gemma import GemmaDecoder, frozen
from dualtoken_jax.mllm import config as C
from dualtoken_jax.mllm import state as S
from dualtoken_jax.mllm.step import make_train_step
from dualtoken_jax.training.state import state_layout, tree_nbytes

GIB = 2**30


@functools.partial(jax.jit, static_argnames=("model", "new"))
def recompute_generate(model: GemmaDecoder, params, prompt, *, new: int):
  """Greedy decoding without a cache: step t runs the whole (P + new)-token buffer causally
  (positions >= P + t masked out as padding) and reads the logits at P + t - 1."""
  b, p = prompt.shape
  tokens = jnp.concatenate([prompt, jnp.zeros((b, new), jnp.int32)], axis=1)

  def body(t, tokens):
    valid = jnp.arange(p + new)[None, :] < p + t
    valid = jnp.broadcast_to(valid, tokens.shape)
    logits, _ = model.apply({"params": params}, tokens, masks.positions_from_mask(valid),
                            masks.causal_padding_mask(valid))
    token = jnp.argmax(logits[:, p + t - 1], axis=-1).astype(jnp.int32)
    return jax.lax.dynamic_update_slice(tokens, token[:, None], (0, p + t))

  return jax.lax.fori_loop(0, new, body, tokens)


def cached_generate(model, params, prompt, new):
  return decoding.generate(model, params, prompt, jnp.ones(prompt.shape, bool), jax.random.key(0),
                           max_new_tokens=new, eos_ids=jnp.zeros((0,), jnp.int32))


def tiny_rows(batch: int, prompt_len: int, new: int, iters: int, warmup: int = 2) -> list[str]:
  config = config_files.load("mllm_tiny").model.llm
  model = GemmaDecoder(frozen(config))
  params = llm_sharding.init_params(config, seed=0)
  prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 3, config.vocab_size)
  cached = jax.jit(lambda p, x: cached_generate(model, p, x, new))
  full = jax.jit(lambda p, x: recompute_generate(model, p, x, new=new))
  same = bool(jnp.all(cached(params, prompt) == full(params, prompt)))
  lines = [f"tiny decoder (width {config.width}, {config.depth} layers, vocab "
           f"{config.vocab_size}), batch {batch}, prompt {prompt_len}, {new} new tokens, greedy; "
           f"identical tokens: {same}"]
  rates = {}
  for name, fn in (("KV cache", cached), ("recompute prefix", full)):
    t = timing.median_time(fn, params, prompt, warmup=warmup, iters=iters)
    rates[name] = batch * new / t
    lines.append(f"  {name:18s} {t * 1e3:9.1f} ms/call  {rates[name]:10.0f} tokens/s")
  lines.append(f"  speed-up of the cache: {rates['KV cache'] / rates['recompute prefix']:.1f}x")
  return lines


def gemma_2b_rows(batch: int, length: int) -> list[str]:
  # Layers unrolled: XLA's cost analysis counts a scanned body once.
  config = llm_config.get_config("gemma_2b", dtype="bfloat16", scan_layers=False)
  model = GemmaDecoder(frozen(config))
  params = llm_sharding.abstract_params(config)  # ShapeDtypeStructs: nothing is allocated
  cache = jax.eval_shape(lambda: decoding.init_cache(config, batch, length))
  x1 = jax.ShapeDtypeStruct((batch, 1, config.width), jnp.bfloat16)
  pos1 = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  mask1 = jax.ShapeDtypeStruct((batch, 1, length), bool)
  step = jax.jit(lambda p, c, x, pos, m: decoding.logits_of(
      model, p, decoding.extend(model, p, c, x, pos, m)[0])).lower(
          params, cache, x1, pos1, mask1).compile()
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t)[0][:, -1]).lower(
      params, tokens).compile()
  prompt = jax.ShapeDtypeStruct((batch, length // 2), jnp.int32)
  loop = jax.jit(lambda p, x: cached_generate(model, p, x, length // 2)).lower(params,
                                                                            prompt).compile()
  flops = lambda c: float(timing.cost(c).get("flops", 0.0))
  peak = lambda c: timing.memory(c)[0] / GIB
  return [
      f"gemma_2b-shaped decoder (bf16 compute, fp32 weights), batch {batch}, {length} "
      "positions, compile only:",
      f"  one cached step:      {flops(step) / 1e9:9.1f} GFLOP/token  peak {peak(step):6.2f} GiB",
      f"  one recompute step:   {flops(forward) / 1e9:9.1f} GFLOP/token  peak "
      f"{peak(forward):6.2f} GiB",
      f"  FLOP ratio recompute/cached: {flops(forward) / max(flops(step), 1):.0f}x",
      f"  whole cached loop ({length // 2} prompt + {length // 2} new): peak {peak(loop):.2f} GiB"]


def sft_memory_rows(fsdp: int, batch_per_device: int, max_len: int,
                    llm: str = "gemma_2b", stage: str = "sft") -> list[str]:
  """Compile-only per-device memory of one step of `configs/mllm_{stage}.py:llm={llm}` (stage
  sft or generation: the generation rows' codes feed the heads)."""
  mesh = sharding.make_mesh({"fsdp": fsdp, "data": -1})
  config = config_files.load(f"mllm_{stage}:llm={llm}")
  if stage == "generation":
    config.data.captions = "(bench)"  # the step computes the heads' code loss
  config.batch_size = batch_per_device * mesh.size
  modules = S.Modules(config)
  layout = state_layout(modules, mesh)
  abstract, shardings = layout.abstract, layout.shardings
  batch_sharding = data.batch_sharding(mesh)
  b, size = config.batch_size, config.model.tokenizer.image_size
  array = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
  batch = {k: array((b, max_len), bool)
           for k in ("image_mask", "input_mask", "loss_mask", "gen_mask")}
  batch.update(tokens=array((b, max_len), jnp.int32), mask_ar=array((b, max_len), jnp.int32),
               has_image=array((b,), bool), image=array((b, size, size, 3), jnp.float32))
  compiled = jax.jit(make_train_step(modules, mesh), in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, None), donate_argnums=0).lower(
                         layout.targets(), batch).compile()
  m = compiled.memory_analysis()
  params = tree_nbytes(abstract.params)
  return [
      f"MLLM {stage} step, {llm}-shaped LLM + SigLIP-L/16-256 DualToken (frozen, in the step), "
      f"{b} samples ({batch_per_device}/device) x {max_len} tokens "
      f"({C.num_image_positions(config.model)} image positions) on mesh {dict(mesh.shape)}:",
      f"  trained params {params / GIB:.2f} GiB fp32 + Adam moments "
      f"{tree_nbytes(abstract.opt_state) / GIB:.2f} GiB + tokenizer "
      f"{tree_nbytes(abstract.tokenizer) / GIB:.2f} GiB, all sharded over fsdp={fsdp}",
      f"  per device: arguments {m.argument_size_in_bytes / GIB:.2f} GiB, temporaries "
      f"{m.temp_size_in_bytes / GIB:.2f} GiB, peak ~ {timing.memory(compiled)[0] / GIB:.2f} GiB"]


def run(argv: list[str]) -> str:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.bench decode")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--prompt", type=int, default=32, help="prompt tokens (tiny model)")
  p.add_argument("--new", type=int, default=64, help="generated tokens (tiny model)")
  p.add_argument("--length", type=int, default=1024, help="positions (2B-shaped model)")
  timing.add_timing_flags(p, iters=10)
  p.add_argument("--fsdp", type=int, default=8)
  p.add_argument("--batch_per_device", type=int, default=1)
  p.add_argument("--max_len", type=int, default=1024, help="SFT sequence length")
  p.add_argument("--devices", type=int, default=8,
                 help="simulated CPU devices (set before jax starts)")
  p.add_argument("--skip_2b", action="store_true", help="only the tiny timing")
  p.add_argument("--sft_llm", default="gemma_2b",
                 help="decoder variant of the SFT memory row (e.g. qwen2.5_3b, the paper's)")
  p.add_argument("--sft_only", action="store_true", help="only the SFT memory row")
  p.add_argument("--sft_stage", default="sft", choices=("sft", "generation"),
                 help="the stage config of that row")
  a = p.parse_args(argv)
  lines = [] if a.sft_only else tiny_rows(a.batch, a.prompt, a.new, a.iters, a.warmup)
  if not a.skip_2b:
    lines += [] if a.sft_only else gemma_2b_rows(a.batch, a.length)
    lines += sft_memory_rows(a.fsdp, a.batch_per_device, a.max_len, a.sft_llm, a.sft_stage)
  lines.append(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
  return "\n".join(lines)
