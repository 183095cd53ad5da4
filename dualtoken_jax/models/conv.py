"""Convolution implementations, chosen by config (`conv_impl`): the same stride-1 2-D convolution
in forms that a backend's compiler may turn into faster kernels than its convolution backward.

  xla      `lax.conv_general_dilated` (Flax's default and ours): XLA's convolution, both passes.
  shifted  a `jax.custom_vjp` convolution written as shifted GEMMs: the output is the sum over the
           kh*kw taps of (a shifted view of the padded input) @ (that tap's Cin x Cout matrix);
           the kernel gradient is one GEMM per tap (shifted input^T @ output gradient), the input
           gradient the same shifted-GEMM convolution of the padded output gradient with the
           flipped, transposed kernel: every pass a dot.
  gemm_dw  XLA's convolution for the forward pass and the input gradient (a convolution with the
           flipped kernel), the kernel gradient -- XLA:CPU's slow pass, ~3x the forward -- as the
           kh*kw GEMMs of `shifted`.

Measured on XLA:CPU (jax 0.10.2, 2 cores; `python -m dualtoken_jax.bench conv`, README) both GEMM
forms are 2-5x slower than "xla" on the decoder's 3x3 shapes, forward and backward (its dots on
these skinny shapes run far below matmul speed), so "xla" stays the default everywhere; the others
are exact alternatives (tested equal to lax.conv, values and gradients) for backends or versions
where the bench says otherwise. An im2col form (one GEMM over the concatenated views) measured
slower still: XLA:CPU's minor-axis concatenate alone took longer than the convolution.

`conv_fn(impl)` returns a drop-in for `lax.conv_general_dilated` that `nn.Conv` takes as its
`conv_general_dilated` attribute, so parameters keep nn.Conv's names and shapes (checkpoints and
reference parity do not depend on the implementation). Cases the GEMM forms do not cover (strides,
dilation, feature groups, other layouts) go to `lax.conv_general_dilated` unchanged.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from dualtoken_jax import config_files

IMPLS = ("xla", "shifted", "gemm_dw")
DEFAULT = "xla"
_NHWC = ("NHWC", "HWIO", "NHWC")


def check_impl(impl: str, field: str = "model.conv_impl") -> None:
  """ConfigError unless `impl` is one of IMPLS (the config validators call this)."""
  if impl not in IMPLS:
    raise config_files.ConfigError(f"{field} must be one of {IMPLS}, got {impl!r}")


def _taps(x_padded, kernel, out_hw: tuple[int, int]):
  """sum over taps (i, j) of x_padded[:, i:i+Ho, j:j+Wo, :] @ kernel[i, j]: a VALID stride-1
  conv of an NHWC input with an HWIO kernel, as kh*kw GEMMs."""
  kh, kw = kernel.shape[:2]
  ho, wo = out_hw
  out = None
  for i in range(kh):
    for j in range(kw):
      view = lax.slice_in_dim(lax.slice_in_dim(x_padded, i, i + ho, axis=1), j, j + wo, axis=2)
      term = jnp.einsum("bhwc,cd->bhwd", view, kernel[i, j],
                        preferred_element_type=jnp.float32)
      out = term if out is None else out + term
  return out


def _pad(x, padding: Sequence[tuple[int, int]]):
  """Spatial padding of an NHWC array; negative amounts crop (lax.pad semantics)."""
  (t, b), (l, r) = padding
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (t, b, 0), (l, r, 0), (0, 0, 0)))


def _out_hw(shape, kernel_shape, padding) -> tuple[int, int]:
  return tuple(shape[1 + a] + padding[a][0] + padding[a][1] - kernel_shape[a] + 1 for a in (0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def shifted_conv(x, kernel, padding):
  """Stride-1 conv of NHWC `x` with HWIO `kernel`, explicit `padding` ((top, bottom), (left,
  right)), as shifted GEMMs in forward and backward (see the module docstring)."""
  return _shifted_fwd(x, kernel, padding)[0]


def _shifted_fwd(x, kernel, padding):
  out = _taps(_pad(x, padding), kernel, _out_hw(x.shape, kernel.shape, padding))
  return out.astype(jnp.result_type(x, kernel)), (x, kernel)


def _kernel_grad(x, g, kernel_shape, padding):
  """d(loss)/d(kernel) of a stride-1 conv: per tap (i, j), the shifted padded input's channels
  against the output gradient's, one GEMM each with the batch and spatial positions contracted."""
  kh, kw = kernel_shape[:2]
  ho, wo = g.shape[1:3]
  x_padded = _pad(x, padding)
  rows = []
  for i in range(kh):
    row = []
    for j in range(kw):
      view = lax.slice_in_dim(lax.slice_in_dim(x_padded, i, i + ho, axis=1), j, j + wo, axis=2)
      row.append(jnp.einsum("bhwc,bhwd->cd", view, g, preferred_element_type=jnp.float32))
    rows.append(jnp.stack(row))
  return jnp.stack(rows)


def _input_grad_padding(kernel_shape, padding):
  """The padding of the output gradient whose VALID conv with the flipped kernel is the input
  gradient: (k-1-lo, k-1-hi) per spatial axis."""
  return [(kernel_shape[a] - 1 - padding[a][0], kernel_shape[a] - 1 - padding[a][1]) for a in (0, 1)]


def _flip(kernel):
  """The kernel flipped in space with its in/out channels swapped (the input gradient's)."""
  return jnp.swapaxes(kernel[::-1, ::-1], 2, 3)


def _shifted_bwd(padding, residuals, g):
  x, kernel = residuals
  dx = _taps(_pad(g, _input_grad_padding(kernel.shape, padding)), _flip(kernel), x.shape[1:3])
  return dx.astype(x.dtype), _kernel_grad(x, g, kernel.shape, padding).astype(kernel.dtype)


shifted_conv.defvjp(_shifted_fwd, _shifted_bwd)


def _lax_conv(x, kernel, padding):
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gemm_dw_conv(x, kernel, padding):
  """Stride-1 conv whose forward and input gradient are XLA convolutions and whose kernel
  gradient (XLA:CPU's slow pass) is kh*kw GEMMs."""
  return _lax_conv(x, kernel, padding)


def _gemm_dw_fwd(x, kernel, padding):
  return _lax_conv(x, kernel, padding), (x, kernel)


def _gemm_dw_bwd(padding, residuals, g):
  x, kernel = residuals
  dx = lax.conv_general_dilated(g, _flip(kernel), (1, 1), _input_grad_padding(kernel.shape, padding),
                                dimension_numbers=_NHWC)
  return dx.astype(x.dtype), _kernel_grad(x, g, kernel.shape, padding).astype(kernel.dtype)


gemm_dw_conv.defvjp(_gemm_dw_fwd, _gemm_dw_bwd)


_GEMM_IMPLS = {"shifted": shifted_conv, "gemm_dw": gemm_dw_conv}


def conv_fn(impl: str, field: str = "model.conv_impl"):
  """A `lax.conv_general_dilated` drop-in running `impl` (for `nn.Conv(conv_general_dilated=…)`);
  "xla" is `lax.conv_general_dilated` itself."""
  check_impl(impl, field)
  if impl == "xla":
    return lax.conv_general_dilated
  gemm = _GEMM_IMPLS[impl]

  def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                           batch_group_count=1, precision=None, preferred_element_type=None):
    plain = (lhs.ndim == 4 and tuple(window_strides) == (1, 1)
             and all(d in (None, 1, (1, 1)) or tuple(d) == (1, 1)
                     for d in (lhs_dilation, rhs_dilation))
             and feature_group_count == 1 and batch_group_count == 1
             and precision is None and preferred_element_type is None
             and _is_nhwc(lhs, rhs, dimension_numbers))
    if plain:
      pads = (lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
              if isinstance(padding, str) else [tuple(p) for p in padding])
      return gemm(lhs, rhs, tuple(tuple(int(v) for v in p) for p in pads))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)

  return conv_general_dilated


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
