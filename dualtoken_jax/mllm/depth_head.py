"""The visual heads of generation (paper section 3.3, spec D.1): an RQ-Transformer-style depth
transformer that predicts one image position's D residual codes from the LLM's hidden state.

DualToken has two of them with the same structure and no shared weights: one over the pixel
codebook, one over the semantic codebook. For one position with LLM hidden state h and codes
c_1..c_D, the depth transformer reads the sequence

    x_1 = proj(h)                      proj: a 2-layer GELU MLP, LLM width -> head width
    x_d = code_in(sum_{d' < d} e(c_d'))    e: the tokenizer's (frozen) codebook, d = 2..D
    x_d += depth_embedding[d]

causally over d (pre-LN blocks, multi-head self-attention with biases, 4x GELU MLP, residual
dropout), and a separate classifier per depth (shared final LayerNorm, then `classifiers[d]`)
gives the logits of c_d over the K codes. Teacher forcing feeds the true codes; sampling
(`generation.py`) fills the input sequence one depth at a time and reads logits at depth d.
Because attention is causal, the logits at depth d never depend on the inputs after d, so the
two agree exactly (tested).

Parameter tree of one head: proj/fc1, proj/fc2, code_in, depth_embedding (D, W),
block_{i}/{norm_attn, attn, norm_mlp, mlp_in, mlp_out}, final_norm, classifiers/kernel
(D, W, K) and classifiers/bias (D, K).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtoken_jax.mllm.projector import Projector
from dualtoken_jax.models import partitioning as P


class DepthBlock(nn.Module):
  """Pre-LN transformer block over the depth axis (VILA-U's RQ-Transformer block)."""
  width: int
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    causal = nn.make_causal_mask(jnp.ones(x.shape[:-1], bool))
    dense = lambda n, names, name: nn.Dense(
        n, dtype=self.dtype, name=name, kernel_init=P.boxed(nn.initializers.xavier_uniform(), names),
        bias_init=P.boxed(nn.initializers.zeros, names[1:]))
    h = nn.LayerNorm(dtype=self.dtype, name="norm_attn")(x)
    h = nn.MultiHeadDotProductAttention(
        self.num_heads, dtype=self.dtype, name="attn",
        kernel_init=nn.initializers.xavier_uniform())(h, h, mask=causal)
    x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = nn.LayerNorm(dtype=self.dtype, name="norm_mlp")(x)
    h = nn.gelu(dense(self.mlp_ratio * self.width, ("embed", "mlp"), "mlp_in")(h),
                approximate=False)
    h = dense(self.width, ("mlp", "embed"), "mlp_out")(h)
    return x + nn.Dropout(self.dropout)(h, deterministic=deterministic)


class DepthHead(nn.Module):
  """One visual head: LLM hidden states (..., D_llm) -> code logits (..., D, K)."""
  num_codes: int       # K, the codebook size
  depth: int           # D, residual depth
  width: int
  num_heads: int
  num_layers: int = 3
  mlp_ratio: int = 4
  dropout: float = 0.1
  dtype: Any = jnp.float32

  def setup(self):
    self.proj = Projector(self.width, self.width, dtype=self.dtype)
    self.code_in = nn.Dense(self.width, dtype=self.dtype,
                            kernel_init=P.boxed(nn.initializers.lecun_normal(), (None, "embed")),
                            bias_init=P.boxed(nn.initializers.zeros, ("embed",)))
    self.depth_embedding = self.param(
        "depth_embedding", P.boxed(nn.initializers.normal(0.02), (None, "embed")),
        (self.depth, self.width))
    self.blocks = [DepthBlock(self.width, self.num_heads, self.mlp_ratio, self.dropout,
                              self.dtype, name=f"block_{i}") for i in range(self.num_layers)]
    self.final_norm = nn.LayerNorm(dtype=self.dtype)
    self.classifiers = _PerDepthClassifiers(self.depth, self.num_codes, self.dtype)

  def first_input(self, hidden):
    """(..., D_llm) -> (..., W): the depth-1 input (depth embedding included)."""
    return self.proj(hidden) + self.depth_embedding[0]

  def code_inputs(self, code_embeddings):
    """Per-depth code embeddings (..., D, d) -> inputs (..., D - 1, W) of depths 2..D: the
    cumulative sums over the codes before each depth, through `code_in`."""
    cumulative = jnp.cumsum(code_embeddings.astype(jnp.float32), axis=-2)[..., :-1, :]
    return self.code_in(cumulative) + self.depth_embedding[1:]

  def code_input(self, cumulative, d):
    """The input of depth `d` (>= 1, 0-based) from the sum (..., d) of the codes before it."""
    return self.code_in(cumulative.astype(jnp.float32)) + self.depth_embedding[d]

  def logits_from_inputs(self, x, deterministic: bool = True):
    """Inputs (..., D, W) -> float32 logits (..., D, K); position d sees inputs <= d only."""
    lead = x.shape[:-2]
    x = x.reshape((-1,) + x.shape[-2:])
    for block in self.blocks:
      x = block(x, deterministic)
    logits = self.classifiers(self.final_norm(x))
    return logits.reshape(lead + logits.shape[-2:])

  def __call__(self, hidden, code_embeddings, deterministic: bool = True):
    """Teacher forcing: hidden (..., D_llm) and the true codes' per-depth embeddings
    (..., D, d) -> logits (..., D, K) of every depth."""
    x = jnp.concatenate([self.first_input(hidden)[..., None, :],
                         self.code_inputs(code_embeddings).astype(self.dtype)], axis=-2)
    return self.logits_from_inputs(x, deterministic)


class _PerDepthClassifiers(nn.Module):
  """A separate Linear(W -> K) per depth (DualToken's choice; RQ-Transformer shares one)."""
  depth: int
  num_codes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # (..., D, W)
    w = x.shape[-1]
    kernel = self.param("kernel", P.boxed(nn.initializers.normal(w ** -0.5), (None, "embed", "vocab")),
                        (self.depth, w, self.num_codes))
    bias = self.param("bias", P.boxed(nn.initializers.zeros, (None, "vocab")),
                      (self.depth, self.num_codes))
    logits = jnp.einsum("...dw,dwk->...dk", x.astype(self.dtype), kernel.astype(self.dtype))
    return logits.astype(jnp.float32) + bias


def cross_entropy(logits, targets, weights):
  """Mean CE over weighted (..., D) predictions; logits (..., D, K), targets (..., D) int,
  weights broadcastable to targets. Returns (loss, accuracy)."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  weights = jnp.broadcast_to(weights, nll.shape).astype(jnp.float32)
  count = jnp.maximum(weights.sum(), 1.0)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (nll * weights).sum() / count, (correct * weights).sum() / count
