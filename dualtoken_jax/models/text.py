"""SigLIP text tower with big_vision's parameter tree (`txt/Embed_0`, `txt/pos_embedding`,
`txt/Encoder_0/...`, `txt/head`). Frozen in DualToken; used for zero-shot and retrieval."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dualtoken_jax.models import partitioning as P
from dualtoken_jax.models.vit import Encoder

Dtype = Any


class TextTower(nn.Module):
  """int32 tokens (B, L) -> (B, out_dim) text features (last token after the final norm)."""
  vocab_size: int
  max_len: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  out_dim: int
  layer_norm_eps: float = 1e-6
  scan: bool = False
  remat_policy: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(f"text tokens must be (batch, length<={self.max_len}), got {tokens.shape}")
    x = nn.Embed(self.vocab_size, self.width, name="Embed_0",
                 embedding_init=P.boxed(nn.initializers.normal(1.0), ("vocab", "embed")))(tokens)
    pos = self.param("pos_embedding", P.boxed(nn.initializers.normal(self.width**-0.5), (None, None, "embed")),
                     (1, self.max_len, self.width), jnp.float32)
    x = (x + pos[:, :tokens.shape[1]]).astype(self.dtype)
    encoder = Encoder(width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                      num_heads=self.num_heads, layer_norm_eps=self.layer_norm_eps,
                      scan=self.scan, remat_policy=self.remat_policy, dtype=self.dtype,
                      name="Encoder_0")
    x = encoder.norm(encoder(x))
    return nn.Dense(self.out_dim, dtype=self.dtype, name="head")(x[:, -1, :])
