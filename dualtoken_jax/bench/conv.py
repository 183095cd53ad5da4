"""`python -m dualtoken_jax.bench conv`: the convolution implementations (`models/conv.py`) side
by side, forward and forward + backward.

Times one 3x3 conv (default 64 -> 64 channels, 128x128, batch 4, NHWC, fp32) and every conv shape
of a config's pixel decoder (default the S/16-128 comparison config), per implementation, with
the implementations alternated round by round in one process (shared machines drift; ratios
within a run do not), medians over all rounds. The decoder total weights each shape by how many
convs have it. XLA flags are per process: compare them with separate runs under `XLA_FLAGS`.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtoken_jax import config_files
from dualtoken_jax.bench import timing
from dualtoken_jax.models import config as model_config
from dualtoken_jax.models import conv as conv_impls
from dualtoken_jax.models import pixel_decoder

_DN = ("NHWC", "HWIO", "NHWC")
Shape = collections.namedtuple("Shape", "batch height width cin cout kernel")


def decoder_conv_shapes(model, batch: int) -> collections.Counter:
  """Counter of the conv Shapes in `model`'s pixel decoder (traced abstractly, nothing runs)."""
  d = model.decoder
  seen = collections.Counter()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      x = args[0]
      seen[Shape(x.shape[0], x.shape[1], x.shape[2], x.shape[3], context.module.features,
                 context.module.kernel_size[0])] += 1
    return next_fun(*args, **kwargs)

  decoder = pixel_decoder.Decoder(ch=d.ch, ch_mult=d.ch_mult, num_res_blocks=d.num_res_blocks,
                                  attn_resolutions=d.attn_resolutions, out_ch=d.out_ch)
  side = model_config.decoder_latent_size(model)
  z = jax.ShapeDtypeStruct((batch, *side, d.in_channels), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda z: decoder.init(jax.random.key(0), z), z)
  return seen


def _functions(shape: Shape, impl: str):
  fn = conv_impls.conv_fn(impl)
  pad = shape.kernel // 2
  conv = lambda x, w: fn(x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=_DN)
  # forward + backward: the vjp with a fixed cotangent, both gradients (input and kernel)
  grads = lambda x, w, g: jax.vjp(conv, x, w)[1](g)
  return jax.jit(conv), jax.jit(grads)


def _inputs(shape: Shape):
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (shape.batch, shape.height, shape.width, shape.cin), jnp.float32)
  w = jax.random.normal(k[1], (shape.kernel, shape.kernel, shape.cin, shape.cout), jnp.float32)
  g = jax.random.normal(k[2], (shape.batch, shape.height, shape.width, shape.cout), jnp.float32)
  return x, w * shape.kernel ** -1 * shape.cin ** -0.5, g


def _once(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def time_shape(shape: Shape, impls, *, rounds: int, iters: int, warmup: int) -> dict:
  """{impl: (forward median s, forward+backward median s)}, the impls alternated per round."""
  x, w, g = _inputs(shape)
  fns = {impl: _functions(shape, impl) for impl in impls}
  for fwd, both in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fwd(x, w))
      jax.block_until_ready(both(x, w, g))
  times = {impl: ([], []) for impl in impls}
  for _ in range(rounds):
    for impl, (fwd, both) in fns.items():
      for _ in range(iters):
        times[impl][0].append(_once(fwd, x, w))
        times[impl][1].append(_once(both, x, w, g))
  return {impl: (statistics.median(f), statistics.median(b)) for impl, (f, b) in times.items()}


def _name(s: Shape) -> str:
  return f"{s.kernel}x{s.kernel} {s.cin:>4d}->{s.cout:<4d} {s.height}x{s.width} B={s.batch}"


def _parse_shape(text: str) -> Shape:
  try:
    values = [int(v) for v in text.split(",")]
    return Shape(*values)
  except (ValueError, TypeError) as e:
    raise SystemExit(f"--single must be B,H,W,Cin,Cout,k (six integers), got {text!r}") from e


def run(argv: list[str]) -> str:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.bench conv")
  p.add_argument("--config", default="configs/bench_ref_s16.py",
                 help="config whose pixel decoder's conv shapes are timed ('none': skip them)")
  p.add_argument("--single", default="4,128,128,64,64,3", help="B,H,W,Cin,Cout,k of the single conv")
  p.add_argument("--batch", type=int, default=4, help="batch of the decoder's shapes")
  p.add_argument("--impls", default=",".join(conv_impls.IMPLS),
                 help="comma-separated models/conv.py implementations (first = the baseline)")
  p.add_argument("--rounds", type=int, default=3, help="alternation rounds (medians over all)")
  timing.add_timing_flags(p, iters=3, warmup=1)
  a = p.parse_args(argv)
  impls = a.impls.split(",")
  for impl in impls:
    conv_impls.check_impl(impl, field="--impls")
  rows = [(_parse_shape(a.single), 0)]  # count 0: the single conv is not part of the decoder
  if a.config != "none":
    model = config_files.model_of(config_files.load(a.config))
    rows += sorted(decoder_conv_shapes(model, a.batch).items(), key=lambda r: -r[0].height)
  base = impls[0]
  head = f"{'conv (NHWC fp32)':34s} {'n':>3s} " + " ".join(
      f"{i + ' fwd':>12s} {i + ' f+b':>12s}" for i in impls) + "  f+b vs " + base
  lines = [head, "-" * len(head)]
  totals = collections.defaultdict(lambda: [0.0, 0.0])
  for shape, n in rows:
    t = time_shape(shape, impls, rounds=a.rounds, iters=a.iters, warmup=a.warmup)
    cells = " ".join(f"{t[i][0] * 1e3:9.2f} ms {t[i][1] * 1e3:9.2f} ms" for i in impls)
    ratios = " ".join(f"{t[base][1] / t[i][1]:.2f}x" for i in impls[1:])
    lines.append(f"{_name(shape):34s} {n:3d} {cells}  {ratios}")
    for i in impls:
      if n:
        totals[i][0] += n * t[i][0]
        totals[i][1] += n * t[i][1]
  if totals:
    cells = " ".join(f"{totals[i][0] * 1e3:9.2f} ms {totals[i][1] * 1e3:9.2f} ms" for i in impls)
    ratios = " ".join(f"{totals[base][1] / totals[i][1]:.2f}x" for i in impls[1:])
    lines.append(f"{'decoder total (' + a.config.split('/')[-1] + ')':34s} {sum(n for _, n in rows):3d} "
                 f"{cells}  {ratios}")
  lines.append(f"medians of {a.rounds} alternated rounds x {a.iters} calls; ratio > 1: faster "
               f"than {base}; device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  return "\n".join(lines)
