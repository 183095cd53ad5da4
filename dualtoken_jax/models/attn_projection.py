"""DualToken's `AttnProjection`: the pre-quant (width -> 32) and post-quant (32 -> width) blocks.

    y = Linear(LN3(x)) + Attn(LN1(x));   y = y + GeGLU(LN2(y))

Attention works at A = max(in, out) channels in `num_heads` heads with BEiT-style biases (q and v
learned, k none). Reducing blocks average the heads' outputs (then adaptive-average-pool to
`out_dim` if a head is wider than it); expanding blocks concatenate heads. The post-quant blocks
are causal in raster order, which is what lets an MLLM feed them generated prefixes. Names follow
the reference (`norm1..3`, `proj`, `attn/{qkv,q_bias,v_bias,proj}`, `mlp/{norm,w0,w1,w2}`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dualtoken_jax.models import attention as attention_impls

Dtype = Any
# PyTorch's default Linear init (kaiming-uniform, a=sqrt(5)) is U(+-1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def adaptive_avg_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_in, n_out) matrix reproducing torch's adaptive_avg_pool1d bins along the last axis."""
  m = np.zeros((n_in, n_out), np.float32)
  for i in range(n_out):
    lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
    m[lo:hi, i] = 1.0 / (hi - lo)
  return m


class ProjectionAttention(nn.Module):
  """Multi-head self-attention between `in_dim` and `out_dim` channels (reference `attn`)."""
  out_dim: int
  num_heads: int
  causal: bool
  dtype: Dtype = jnp.float32
  attention_chunk: int = 0  # queries per attention block; 0 = all at once
  attention_impl: str = attention_impls.DEFAULT  # an attention.IMPLS name
  pallas_interpret: bool = False

  @nn.compact
  def __call__(self, x):
    b, n, in_dim = x.shape
    a = max(in_dim, self.out_dim)
    head_dim = a // self.num_heads
    qkv = nn.Dense(3 * a, use_bias=False, kernel_init=torch_linear_init, dtype=self.dtype,
                   name="qkv")(x)
    q_bias = self.param("q_bias", nn.initializers.zeros, (a,), jnp.float32)
    v_bias = self.param("v_bias", nn.initializers.zeros, (a,), jnp.float32)
    qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, head_dim), 3, axis=2)
    y = attention_impls.attend(q[:, :, 0], k[:, :, 0], v[:, :, 0], impl=self.attention_impl,
                               causal=self.causal, chunk=self.attention_chunk,
                               interpret=self.pallas_interpret, dtype=self.dtype)
    if in_dim > self.out_dim:
      y = jnp.mean(y, axis=2)  # (b, n, head_dim): the heads vote on the low-dim vector
      if head_dim != self.out_dim:
        y = y @ jnp.asarray(adaptive_avg_pool_matrix(head_dim, self.out_dim), y.dtype)
    else:
      y = y.reshape(b, n, a)
    return nn.Dense(self.out_dim, kernel_init=torch_linear_init, dtype=self.dtype, name="proj")(y)


class GeGluMlp(nn.Module):
  """W2(gelu_tanh(W0 LN(z)) * W1 LN(z)), with its own LayerNorm (eps 1e-6)."""
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    d = z.shape[-1]
    dense = functools.partial(nn.Dense, kernel_init=torch_linear_init, dtype=self.dtype)
    z = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(z)
    z = nn.gelu(dense(self.hidden_dim, name="w0")(z), approximate=True) * dense(self.hidden_dim, name="w1")(z)
    return dense(d, name="w2")(z)


class AttnProjection(nn.Module):
  """Maps (B,N,in_dim) -> (B,N,out_dim); see the module docstring."""
  out_dim: int
  num_heads: int
  causal: bool = False
  mlp_ratio: int = 2
  dtype: Dtype = jnp.float32
  attention_chunk: int = 0
  attention_impl: str = attention_impls.DEFAULT
  pallas_interpret: bool = False

  @nn.compact
  def __call__(self, x):
    ln = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=self.dtype)
    y = nn.Dense(self.out_dim, kernel_init=torch_linear_init, dtype=self.dtype, name="proj")(
        ln(name="norm3")(x))
    y = y + ProjectionAttention(self.out_dim, self.num_heads, self.causal, dtype=self.dtype,
                                attention_chunk=self.attention_chunk,
                                attention_impl=self.attention_impl,
                                pallas_interpret=self.pallas_interpret, name="attn")(ln(name="norm1")(x))
    return y + GeGluMlp(self.out_dim * self.mlp_ratio, dtype=self.dtype, name="mlp")(
        ln(name="norm2")(y))
