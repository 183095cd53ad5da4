"""SigLIP vision tower with big_vision's parameter tree, and the shared transformer encoder.

Parameter names match big_vision `models/vit.py` (`embedding`, `pos_embedding`,
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm`, `MAPHead_0`), so released
big_vision checkpoints map one to one. With `scan=True` the blocks are stored stacked on axis 0
under `Transformer/encoderblock`, big_vision's scan layout.

DualToken taps blocks in the middle of the tower and replaces the hidden state after
`layer_sem`, so the encoder runs a *range* of blocks per call (`Encoder(x, start, stop)`): taps
are range boundaries, in both layouts, and no per-layer activation is kept unless asked for.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtoken_jax.models import partitioning as P
from dualtoken_jax.models import attention as attention_impls

Dtype = Any


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> tanh-GELU -> Dense (big_vision `MlpBlock`)."""
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              bias_init=P.boxed(nn.initializers.normal(1e-6), ("mlp",)))
    x = dense(self.mlp_dim, kernel_init=P.boxed(nn.initializers.xavier_uniform(), ("embed", "mlp")),
              name="Dense_0")(x)
    x = nn.gelu(x, approximate=True)
    x = dense(width, kernel_init=P.boxed(nn.initializers.xavier_uniform(), ("mlp", "embed")),
              bias_init=P.boxed(nn.initializers.normal(1e-6), ("embed",)), name="Dense_1")(x)
    return x


def attention(num_heads: int, dtype: Dtype, name: str, query_chunk: int = 0,
              impl: str = attention_impls.DEFAULT,
              interpret: bool = False) -> nn.MultiHeadDotProductAttention:
  """Flax MHA with big_vision's kernel layout (query (D,H,hd), out (H,hd,D)) and logical axes;
  `impl` is an `attention.IMPLS` name (the parameters do not depend on it); with "chunked",
  `query_chunk` > 0 computes the attention that many queries at a time (same result)."""
  xavier = nn.initializers.xavier_uniform()
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, dtype=dtype, deterministic=True, name=name,
      attention_fn=attention_impls.flax_attention_fn(impl, query_chunk, interpret),
      kernel_init=P.boxed(xavier, ("embed", "heads", "kv")),
      bias_init=P.boxed(nn.initializers.zeros, ("heads", "kv")),
      out_kernel_init=P.boxed(xavier, ("heads", "kv", "embed")),
      out_bias_init=P.boxed(nn.initializers.zeros, ("embed",)))


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  attention_chunk: int = 0
  attention_impl: str = attention_impls.DEFAULT
  pallas_interpret: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))
    ln = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype,
                           scale_init=P.boxed(nn.initializers.ones, ("norm",)),
                           bias_init=P.boxed(nn.initializers.zeros, ("norm",)))
    y = ln(name="LayerNorm_0")(x)
    y = attention(self.num_heads, self.dtype, "MultiHeadDotProductAttention_0",
                  self.attention_chunk, self.attention_impl, self.pallas_interpret)(y, y)
    x = x + y
    y = ln(name="LayerNorm_1")(x)
    y = MlpBlock(self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y)
    return x + y


class Encoder(nn.Module):
  """Blocks `encoderblock_{i}` (or stacked `encoderblock`) and the final `encoder_norm`.

  `__call__(x, start, stop)` runs blocks [start, stop) (0-based) and returns the residual
  stream; with `collect=True` it also returns each block's output stacked on axis 0.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  layer_norm_eps: float = 1e-6
  scan: bool = False
  remat_policy: str | None = None  # a `jax.checkpoint_policies` name; None = no remat
  dtype: Dtype = jnp.float32
  attention_chunk: int = 0  # queries per attention block; 0 = all at once
  attention_impl: str = attention_impls.DEFAULT  # an attention.IMPLS name
  pallas_interpret: bool = False  # Pallas kernels in the TPU interpreter (tests)

  def setup(self):
    if self.scan:
      self.encoderblock = self.param("encoderblock", self._init_stacked)
    else:
      cls = Encoder1DBlock
      if self.remat_policy:
        # Outside a scan the optimisation barriers are what stop XLA from merging the
        # recomputation back into the forward pass (prevent_cse=False suits scans only).
        cls = nn.remat(cls, policy=getattr(jax.checkpoint_policies, self.remat_policy))
      self.blocks = [cls(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                         layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                         attention_chunk=self.attention_chunk,
                         attention_impl=self.attention_impl,
                         pallas_interpret=self.pallas_interpret,
                         name=f"encoderblock_{i}") for i in range(self.depth)]
    self.encoder_norm = nn.LayerNorm(
        epsilon=self.layer_norm_eps, dtype=self.dtype, name="encoder_norm",
        scale_init=P.boxed(nn.initializers.ones, ("norm",)),
        bias_init=P.boxed(nn.initializers.zeros, ("norm",)))

  def __call__(self, x, start: int = 0, stop: int | None = None, collect: bool = False):
    stop = self.depth if stop is None else stop
    if not 0 <= start <= stop <= self.depth:
      raise ValueError(f"block range [{start}, {stop}) is outside [0, {self.depth})")
    if self.scan:
      return self._run_stacked(x, start, stop, collect)
    outs = []
    for i in range(start, stop):
      x = self.blocks[i](x)
      outs.append(x)
    if collect:
      return x, (jnp.stack(outs) if outs else jnp.zeros((0,) + x.shape, x.dtype))
    return x

  def _run_stacked(self, x, start, stop, collect):
    if start == stop:
      return (x, jnp.zeros((0,) + x.shape, x.dtype)) if collect else x
    segment = jax.tree.map(lambda a: a[start:stop], self.encoderblock)
    apply_block = self._unbound_block().apply

    def body(h, block_params):
      h = apply_block({"params": block_params}, h)
      return h, (h if collect else None)

    if self.remat_policy:
      body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, self.remat_policy),
                            prevent_cse=False)
    x, ys = jax.lax.scan(body, x, segment)
    return (x, ys) if collect else x

  def _unbound_block(self):
    # parent=None: a free-standing module whose params the scan passes in explicitly.
    return Encoder1DBlock(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                          layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                          attention_chunk=self.attention_chunk,
                          attention_impl=self.attention_impl,
                          pallas_interpret=self.pallas_interpret, parent=None)

  def _init_stacked(self, rng):
    """All blocks' params stacked on axis 0, with the logical axis name "layers" prepended."""
    x = jnp.zeros((1, 1, self.width), self.dtype)  # block params do not depend on the length
    init_one = lambda k: self._unbound_block().init(k, x)["params"]
    stacked = jax.vmap(init_one)(jax.random.split(rng, self.depth))
    return P.add_layers_axis(stacked)

  def norm(self, x):
    return self.encoder_norm(x)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends to the tokens (big_vision `MAPHead`)."""
  mlp_dim: int
  num_heads: int
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  attention_impl: str = attention_impls.DEFAULT
  pallas_interpret: bool = False

  @nn.compact
  def __call__(self, x):
    n, _, d = x.shape
    probe = self.param("probe", P.boxed(nn.initializers.xavier_uniform(), (None, None, "embed")),
                       (1, 1, d), jnp.float32)
    probe = jnp.tile(probe, [n, 1, 1]).astype(self.dtype)
    x = attention(self.num_heads, self.dtype, "MultiHeadDotProductAttention_0",
                  impl=self.attention_impl, interpret=self.pallas_interpret)(probe, x)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm_0")(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y)
    return x[:, 0]


class VisionTower(nn.Module):
  """SigLIP image tower (big_vision `vit._Model`, pool_type="map", no classifier head).

  Methods are the pieces DualToken wires together: `embed` (patches + position embedding),
  `encoder(x, start, stop)`, `pool` (encoder_norm + MAP head). `__call__` is plain SigLIP.
  """
  patch_size: int
  grid: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  layer_norm_eps: float = 1e-6
  scan: bool = False
  remat_policy: str | None = None
  dtype: Dtype = jnp.float32
  attention_chunk: int = 0
  attention_impl: str = attention_impls.DEFAULT
  pallas_interpret: bool = False

  def setup(self):
    p = self.patch_size
    self.embedding = nn.Conv(
        self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="embedding",
        kernel_init=P.boxed(nn.initializers.lecun_normal(), (None, None, None, "embed")),
        bias_init=P.boxed(nn.initializers.zeros, ("embed",)))
    self.pos_embedding = self.param(
        "pos_embedding", P.boxed(nn.initializers.normal(stddev=1 / self.width**0.5), (None, "act_len", "embed")),
        (1, self.grid * self.grid, self.width), jnp.float32)
    self.Transformer = Encoder(
        width=self.width, depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        layer_norm_eps=self.layer_norm_eps, scan=self.scan, remat_policy=self.remat_policy,
        dtype=self.dtype, attention_chunk=self.attention_chunk, attention_impl=self.attention_impl,
        pallas_interpret=self.pallas_interpret)
    self.MAPHead_0 = MAPHead(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                             layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                             attention_impl=self.attention_impl,
                             pallas_interpret=self.pallas_interpret)

  def embed(self, images):
    """(B,H,W,3) in [-1,1] -> (B, grid*grid, width) tokens in raster order."""
    x = self.embedding(images.astype(self.dtype))
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    return x + self.pos_embedding.astype(x.dtype)

  def encoder(self, x, start=0, stop=None, collect=False):
    return self.Transformer(x, start, stop, collect)

  def pool(self, x):
    """Post-LayerNorm then MAP head: (B,N,D) -> (B,D)."""
    return self.MAPHead_0(self.Transformer.norm(x))

  def __call__(self, images, collect=False):
    """Plain SigLIP image features (the frozen teacher): pooled, plus hidden states if asked."""
    h0 = self.embed(images)
    if collect:
      x, hs = self.encoder(h0, collect=True)
      return self.pool(x), jnp.concatenate([h0[None], hs], axis=0)
    return self.pool(self.encoder(h0))
