"""Attention implementations, chosen by config (`attention_impl`): the same maths on each backend's
fastest path.

  chunked     today's path and the default: Flax's `dot_product_attention`, `attention_chunk`
              queries at a time (`chunked_attention.py`; 0 = all at once). The decoder LLM's
              "chunked" is its own einsum attention, the only one with logit soft-capping.
  xla         `jax.nn.dot_product_attention(implementation="xla")`: XLA's fused softmax(QKᵀ)V.
  cudnn       `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention (GPU
              only; bf16/fp16 inputs).
  pallas_tpu  the Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu`), with
              sequences padded to its 128-row blocks and the padding masked by segment ids.
              `interpret=True` runs it in the TPU interpreter on any backend (slow: tests only).

All take queries (B, T, N, H) and keys/values (B, S, K, H) with K dividing N (grouped-query
attention), an optional boolean mask broadcastable to (B, N, T, S) and/or `causal`, and return
(B, T, N, H). Each raises `ConfigError` naming the config field when asked for on a backend that
cannot run it, instead of failing deep inside XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dualtoken_jax import config_files
from dualtoken_jax.models import config as model_config
from dualtoken_jax.models.chunked_attention import query_chunked

IMPLS = model_config.ATTENTION_IMPLS
DEFAULT = "chunked"
_PALLAS_BLOCK = 128  # the TPU flash kernel's sequence blocks are multiples of 128 rows
# Masked logits in the Pallas kernel's bias: finite, so a fully masked row cannot produce NaNs.
_NEG_INF = -2.3819763e38


def check_impl(impl: str, field: str = "model.attention_impl") -> None:
  """ConfigError unless `impl` is one of IMPLS (the config validators call this)."""
  if impl not in IMPLS:
    raise config_files.ConfigError(f"{field} must be one of {IMPLS}, got {impl!r}")


def check_backend(impl: str, interpret: bool = False, field: str = "model.attention_impl") -> None:
  """ConfigError if the default backend cannot run `impl` (cuDNN needs a GPU, the Pallas TPU
  kernel a TPU unless `interpret`)."""
  check_impl(impl, field)
  backend = jax.default_backend()
  if impl == "cudnn" and backend != "gpu":
    raise config_files.ConfigError(f"{field}='cudnn' needs a GPU backend, but JAX runs on "
                                   f"{backend!r}; use 'xla' or 'chunked'")
  if impl == "pallas_tpu" and backend != "tpu" and not interpret:
    raise config_files.ConfigError(f"{field}='pallas_tpu' needs a TPU backend, but JAX runs on "
                                   f"{backend!r}; use 'xla' or 'chunked' (or pallas_interpret=True "
                                   f"to run the kernel in the TPU interpreter, slowly)")


def attend(q, k, v, *, impl: str, mask=None, causal: bool = False, scale: float | None = None,
           chunk: int = 0, interpret: bool = False, dtype=None,
           field: str = "model.attention_impl"):
  """softmax(scale·QKᵀ + mask)V with `impl` (see the module docstring); `scale` defaults to
  1/sqrt(H), `chunk` is the chunked path's queries per block, `dtype` its compute dtype."""
  check_backend(impl, interpret, field)
  head_dim = q.shape[-1]
  if impl in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                        implementation=impl)
  t, s = q.shape[1], k.shape[1]
  kernel_causal = causal and impl == "pallas_tpu" and mask is None and t == s
  if causal and not kernel_causal:
    tri = jnp.tril(jnp.ones((t, s), bool))[None, None]
    mask = tri if mask is None else jnp.logical_and(mask, tri)
  if impl == "chunked":
    if scale is not None:  # Flax scales by 1/sqrt(H): fold the requested scale into the queries
      q = q * jnp.asarray(scale * head_dim ** 0.5, q.dtype)
    if k.shape[2] != q.shape[2]:
      k, v = (jnp.repeat(a, q.shape[2] // a.shape[2], axis=2) for a in (k, v))
    return query_chunked(chunk)(q, k, v, mask=mask, dtype=dtype)
  return _pallas_tpu(q, k, v, mask, kernel_causal,
                     scale if scale is not None else head_dim ** -0.5, interpret)


def flax_attention_fn(impl: str, chunk: int = 0, interpret: bool = False):
  """An `attention_fn` for `nn.MultiHeadDotProductAttention` running `impl`; "chunked" is exactly
  `query_chunked(chunk)` (today's path, the same numbers)."""
  if impl == "chunked":
    return query_chunked(chunk)

  def attention_fn(query, key, value, bias=None, mask=None, dtype=None, **unused):
    del unused  # dropout arguments: the towers run deterministically
    if bias is not None:
      raise ValueError(f"attention_impl={impl!r} takes no attention bias")
    return attend(query, key, value, impl=impl, mask=mask, interpret=interpret, dtype=dtype)

  return attention_fn


def _pallas_tpu(q, k, v, mask, causal: bool, scale: float, interpret: bool):
  """The TPU flash kernel on (B, T, N, H) inputs: heads to axis 1, kv heads repeated to N,
  sequences padded to 128-row blocks (padding in its own segment), any mask as a bias. The
  kernel's own causal mode is exact on the padded layout (padded keys follow every real query)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
  b, t, n, h = q.shape
  s = k.shape[1]
  if k.shape[2] != n:
    k, v = (jnp.repeat(a, n // a.shape[2], axis=2) for a in (k, v))
  tp, sp = (-(-x // _PALLAS_BLOCK) * _PALLAS_BLOCK for x in (t, s))
  heads_first = lambda a, length: jnp.pad(jnp.swapaxes(a, 1, 2),
                                          ((0, 0), (0, 0), (0, length - a.shape[1]), (0, 0)))
  qh, kh, vh = heads_first(q, tp), heads_first(k, sp), heads_first(v, sp)
  segments = fa.SegmentIds(q=jnp.broadcast_to((jnp.arange(tp) < t).astype(jnp.int32), (b, tp)),
                           kv=jnp.broadcast_to((jnp.arange(sp) < s).astype(jnp.int32), (b, sp)))
  bias = None
  if mask is not None:
    full = jnp.broadcast_to(mask, (b, n, t, s))
    bias = jnp.where(full, 0.0, _NEG_INF).astype(jnp.float32)
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, tp - t), (0, sp - s)))
  kernel = functools.partial(fa.flash_attention, causal=causal, sm_scale=float(scale))
  if interpret:
    kernel = _in_tpu_interpreter(kernel)
  out = kernel(qh, kh, vh, bias, segments)
  return jnp.swapaxes(out[:, :, :t], 1, 2).astype(q.dtype)


def _in_tpu_interpreter(kernel):
  """`kernel(q, k, v, bias, segments)` with its forward *and* backward Pallas calls traced under
  the TPU interpreter (a plain `with` around the forward would miss the backward kernels, which
  are traced later, when the gradient is taken)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

  @jax.custom_vjp
  def run(q, k, v, bias, segments):
    with pltpu.force_tpu_interpret_mode():
      return kernel(q, k, v, bias, segments)

  def fwd(q, k, v, bias, segments):
    with pltpu.force_tpu_interpret_mode():
      out, vjp = jax.vjp(lambda q, k, v, bias: kernel(q, k, v, bias, segments), q, k, v, bias)
    return out, (vjp, segments)

  def bwd(res, g):
    vjp, segments = res
    with pltpu.force_tpu_interpret_mode():
      grads = vjp(g)
    return (*grads, jax.tree.map(lambda a: None, segments))

  run.defvjp(fwd, bwd)
  return run
