"""Fused nearest-code search: distances and a running argmin over codebook tiles, in one Pallas
kernel (GPU and TPU), so the (N, K) distance matrix never exists in HBM.

The XLA path (`residual.nearest_code`) already bounds memory by scanning codebook chunks, but
each chunk's (N, chunk) distances still go to HBM and back for the argmin. Here every grid step
holds a block of `block_n` vectors and their running (best distance, best index) in fast memory
(VMEM on TPU, registers/shared memory on GPU) and loops over `block_k`-row tiles of the codebook,
which is read whole into fast memory once (stored transposed, (d, K): 2 MiB at K=16384, d=32).
The arithmetic is `residual.nearest_code`'s exactly — ‖x‖² + ‖e‖² − 2 x·e in float32 at HIGHEST
precision, ties to the lowest index (min over the tile, then the smallest index attaining it;
across tiles only a strictly smaller distance wins) — so both give identical indices.

`search(x, codebook, impl=...)` is what the quantizer calls: "auto" takes the kernel on GPU/TPU
and XLA elsewhere; "pallas" with `interpret=True` runs the kernel in the Pallas interpreter on
any backend (slow: tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dualtoken_jax.quantization import residual

IMPLS = ("auto", "xla", "pallas")
ACCELERATORS = ("gpu", "tpu")
# (block_n, block_k) per backend: TPU tiles are (8, 128)-aligned and VMEM is large; a GPU block's
# (block_n, block_k) distance tile lives in registers, so it is smaller there.
_BLOCKS = {"tpu": (256, 512), "gpu": (64, 128)}
_DEFAULT_BLOCKS = (128, 128)


def resolve(impl: str) -> str:
  """"auto" -> "pallas" on GPU/TPU, else "xla"; ValueError naming the field for unknown names."""
  if impl not in IMPLS:
    raise ValueError(f"model.nearest_code_impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "pallas" if jax.default_backend() in ACCELERATORS else "xla"
  return impl


def search(x: jax.Array, codebook: jax.Array, *, impl: str = "auto", chunk: int = 2048,
           interpret: bool = False) -> jax.Array:
  """(N,) int32 index of the nearest codebook row for each row of `x`; `chunk` is the XLA path's
  codebook rows per distance chunk."""
  impl = resolve(impl)
  if impl == "xla":
    return residual.nearest_code(x, codebook, chunk)
  backend = jax.default_backend()
  if backend not in ACCELERATORS and not interpret:
    raise ValueError(f"model.nearest_code_impl='pallas' needs a GPU or TPU backend, but JAX runs "
                     f"on {backend!r}; use 'auto' or 'xla' (or pallas_interpret=True)")
  block_n, block_k = _BLOCKS.get(backend, _DEFAULT_BLOCKS)
  return nearest_code_pallas(x, codebook, block_n=block_n, block_k=block_k, interpret=interpret)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "interpret"))
def nearest_code_pallas(x: jax.Array, codebook: jax.Array, *, block_n: int = 128,
                        block_k: int = 128, interpret: bool = False) -> jax.Array:
  """The fused kernel; see the module docstring. Pads N to `block_n` rows, K to `block_k` rows
  (padded codes have ‖e‖² = inf, so they never win) and, on GPU, K and d to powers of two."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  x = x.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  n, d = x.shape
  k = codebook.shape[0]
  x_sq = jnp.sum(x * x, axis=1, keepdims=True)            # as residual.nearest_code computes them
  e_sq = jnp.sum(codebook * codebook, axis=1)
  n_pad, k_pad, d_pad = _round_up(n, block_n), _round_up(k, block_k), d
  if jax.default_backend() == "gpu" and not interpret:  # Triton blocks are powers of two
    k_pad, d_pad = max(_next_pow2(k_pad), block_k), _next_pow2(d)
  x = jnp.pad(x, ((0, n_pad - n), (0, d_pad - d)))
  x_sq = jnp.pad(x_sq, ((0, n_pad - n), (0, 0)))
  codebook_t = jnp.pad(codebook, ((0, k_pad - k), (0, d_pad - d))).T      # (d, K): lanes = codes
  e_sq = jnp.pad(e_sq, (0, k_pad - k), constant_values=jnp.inf)[None]     # (1, K)
  n_tiles = k_pad // block_k

  def kernel(x_ref, x_sq_ref, codebook_ref, e_sq_ref, out_ref):
    xb, xb_sq = x_ref[...], x_sq_ref[...]

    def tile(j, best):
      best_dist, best_idx = best
      start = pl.multiple_of(j * block_k, block_k)
      rows = codebook_ref[:, pl.ds(start, block_k)]                      # (d, block_k)
      rows_sq = e_sq_ref[:, pl.ds(start, block_k)]                       # (1, block_k)
      dot = jnp.dot(xb, rows, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)
      dist = (xb_sq + rows_sq) - 2.0 * dot                               # (block_n, block_k)
      d_min = jnp.min(dist, axis=1, keepdims=True)
      iota = jax.lax.broadcasted_iota(jnp.int32, dist.shape, 1)
      idx = jnp.min(jnp.where(dist == d_min, iota, block_k), axis=1, keepdims=True) + start
      better = d_min < best_dist  # strict: an earlier tile wins ties
      return jnp.where(better, d_min, best_dist), jnp.where(better, idx, best_idx)

    init = (jnp.full((block_n, 1), jnp.inf, jnp.float32), jnp.zeros((block_n, 1), jnp.int32))
    _, best_idx = jax.lax.fori_loop(0, n_tiles, tile, init)
    out_ref[...] = best_idx

  out = pl.pallas_call(
      kernel,
      grid=(n_pad // block_n,),
      in_specs=[pl.BlockSpec((block_n, d_pad), lambda i: (i, 0)),
                pl.BlockSpec((block_n, 1), lambda i: (i, 0)),
                pl.BlockSpec((d_pad, k_pad), lambda i: (0, 0)),   # the whole table, fetched once
                pl.BlockSpec((1, k_pad), lambda i: (0, 0))],
      out_specs=pl.BlockSpec((block_n, 1), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((n_pad, 1), jnp.int32),
      interpret=interpret,
  )(x, x_sq, codebook_t, e_sq)
  return out[:n, 0]
