"""The decoder (Gemma 1/2/3, Qwen2/2.5, Llama 2/3 text) in Linen, with the official Gemma
checkpoints' names for every family (what differs between families is config data, see
`config.FAMILY_DEFAULTS`: norm offset, embedding scaling, activation, q/k/v biases, tying, RoPE).

Parameter tree (loop layout; `scan_layers=True` stores the blocks stacked on axis 0 under
`layers/...`, big_vision's scan layout with the gm leaf names):

  embedder/input_embedding              (V, D)       tied input/output table
  layer_{i}/pre_attention_norm/scale    (D,)
  layer_{i}/attn/...                    see attention.py
  layer_{i}/post_attention_norm/scale   (D,)         Gemma 2/3
  layer_{i}/pre_ffw_norm/scale          (D,)
  layer_{i}/mlp/gating_einsum           (2, D, F)    act(x W[0]) * (x W[1]); GELU-tanh (GeGLU,
                                                     Gemma) or SiLU (SwiGLU, Qwen2 / Llama)
  layer_{i}/mlp/linear                  (F, D)
  layer_{i}/post_ffw_norm/scale         (D,)         Gemma 2/3
  final_norm/scale                      (D,)
  embedder/output_embedding             (V, D)       untied output table (`tie_embeddings=False`)

Norms multiply by `norm_offset + scale` (Gemma: 1 + scale; Qwen2 / Llama: scale). Token
embeddings are multiplied by sqrt(D) where `scale_embeddings` (Gemma; cast to the activation
dtype); embeddings passed in directly (`embedded_prefix`, e.g. projected image features) never
are. The KV cache lives in the
`cache` collection: `k`/`v` (L, B, S, K, H), the slots' token `positions` (B, S) and the write
`index`. S, the fixed cache length, is the key axis of the mask given to the first (prefill)
call. Every layer keeps all S slots (local layers mask by position instead of keeping only
their window).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dualtoken_jax.llm import config as C
from dualtoken_jax.llm import masks
from dualtoken_jax.llm.attention import Attention, RMSNorm, fan_in_init
from dualtoken_jax.models.config import REMAT_POLICIES
from dualtoken_jax.models import partitioning as P


def frozen(config) -> ml_collections.FrozenConfigDict:
  """Modules take a hashable config (so they can be static jit arguments)."""
  if isinstance(config, ml_collections.FrozenConfigDict):
    return config
  C.validate(config)
  return ml_collections.FrozenConfigDict(config)


def remat_policy(name: str):
  """Config name -> jax.checkpoint policy; None when remat is off."""
  attr = REMAT_POLICIES[name]
  return None if attr is None else getattr(jax.checkpoint_policies, attr)


ACTIVATIONS = {"gelu_tanh": lambda x: nn.gelu(x, approximate=True), "silu": nn.silu}


class FeedForward(nn.Module):
  """Gated MLP (GeGLU or SwiGLU, `config.activation`) with `gating_einsum` (2, D, F) and
  `linear` (F, D) stored without a `/w` leaf."""
  config: Any

  @nn.compact
  def __call__(self, x):
    c = self.config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    gating = self.param("gating_einsum", P.boxed(fan_in_init(1, 2, 0), (None, "embed", "mlp")),
                        (2, c.width, c.mlp_dim), pdtype)
    linear = self.param("linear", P.boxed(fan_in_init(0, 1), ("mlp", "embed")),
                        (c.mlp_dim, c.width), pdtype)
    gate = jnp.einsum("btd,cdf->cbtf", x, gating.astype(dtype))
    hidden = ACTIVATIONS[c.activation](gate[0]) * gate[1]
    return jnp.einsum("btf,fd->btd", hidden, linear.astype(dtype))


class Embedder(nn.Module):
  """The token table `input_embedding` (V, D): lookup (scaled by sqrt(D) if `scale`) and output
  projection, through the same table (tied) or `output_embedding` (V, D) (HF's lm_head)."""
  vocab_size: int
  width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scale: bool = True
  tied: bool = True

  def setup(self):
    table = lambda name: self.param(
        name, P.boxed(nn.initializers.normal(self.width ** -0.5), ("vocab", "embed")),
        (self.vocab_size, self.width), self.param_dtype)
    self.input_embedding = table("input_embedding")
    self.output_embedding = self.input_embedding if self.tied else table("output_embedding")

  def encode(self, tokens):
    x = jnp.take(self.input_embedding, tokens, axis=0).astype(self.dtype)
    if not self.scale:
      return x
    return x * jnp.asarray(math.sqrt(self.width), self.dtype)

  def decode(self, x):
    table = self.output_embedding.astype(self.dtype)
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), table,
                      preferred_element_type=jnp.float32)


class Block(nn.Module):
  """Pre-norm attention and gated MLP, each optionally post-normed (Gemma 2/3) before the
  residual."""
  config: Any

  @nn.compact
  def __call__(self, x, positions, k_positions, mask, schedule, kv_cache=None, cache_index=None):
    c = self.config
    pdtype = jnp.dtype(c.param_dtype)
    norm = lambda name: RMSNorm(c.norm_eps, pdtype, c.norm_offset, name=name)
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))
    y = norm("pre_attention_norm")(x)
    y, kv_cache = Attention(c, name="attn")(
        y, positions, k_positions, mask, schedule["window"], schedule["rope_base"],
        schedule["rope_scale"], kv_cache, cache_index)
    if c.post_attn_norm:
      y = norm("post_attention_norm")(y)
    x = x + y
    y = FeedForward(c, name="mlp")(norm("pre_ffw_norm")(x))
    if c.post_ffw_norm:
      y = norm("post_ffw_norm")(y)
    return x + y, kv_cache


class GemmaDecoder(nn.Module):
  """The decoder. Use `__call__` on tokens, or `embed_tokens` + `transform` + `compute_logits`
  to mix in precomputed embeddings and to compute logits only where needed."""
  config: Any  # a FrozenConfigDict (see `frozen`)

  def setup(self):
    c = self.config
    pdtype = jnp.dtype(c.param_dtype)
    self.embedder = Embedder(c.vocab_size, c.width, jnp.dtype(c.dtype), pdtype,
                             c.scale_embeddings, c.tie_embeddings)
    if c.scan_layers:
      self.layers = self.param("layers", self._init_stacked)
    else:
      block = Block
      policy = remat_policy(c.remat_policy)
      if policy is not None:
        block = nn.remat(Block, policy=policy, prevent_cse=False)
      self.blocks = [block(c, name=f"layer_{i}") for i in range(c.depth)]
    self.final_norm = RMSNorm(c.norm_eps, pdtype, c.norm_offset, name="final_norm")

  # ---------------------------------------------------------------- public pieces
  def embed_tokens(self, tokens):
    """int tokens (B, T) -> (B, T, D) embeddings (* sqrt(D) where `scale_embeddings`), in the
    activation dtype."""
    return self.embedder.encode(tokens)

  def compute_logits(self, pre_logits):
    """(..., D) final-normed states -> float32 logits over the vocabulary (the tied table or
    `output_embedding`)."""
    logits = self.embedder.decode(pre_logits)
    cap = self.config.final_logit_softcap
    return logits if cap is None else jnp.tanh(logits / cap) * cap

  def transform(self, x, positions, attn_mask, *, decode: bool = False,
                return_hidden: bool = False):
    """Runs the layers and the final norm over embeddings.

    Args:
      x: (B, T, D) embeddings (already scaled where they come from tokens).
      positions: (B, T) int RoPE positions.
      attn_mask: (B, T, S) bool; S == T without a cache, S == cache length with `decode`.
      decode: read/extend the `cache` collection (apply with `mutable=["cache"]`). The first
        call creates a cache of S slots and writes the T new tokens at slot 0.
      return_hidden: also return the residual stream (L+1, B, T, D): the input and every
        layer's output (before the final norm).

    Returns:
      (pre_logits (B, T, D), hidden or None).
    """
    c = self.config
    b, t = positions.shape
    if attn_mask.shape[:2] != (b, t):
      raise ValueError(f"attn_mask {attn_mask.shape} must be (batch, {t}, keys) for {t} tokens")
    schedule = jax.tree.map(jnp.asarray, C.layer_schedule(c))
    kv, index, k_positions = None, None, positions
    if decode:
      kv, index, k_positions, commit = self._cache(b, t, attn_mask.shape[2], positions)
    elif attn_mask.shape[2] != t:
      raise ValueError(f"without a cache attn_mask must be square, got {attn_mask.shape}")
    run = self._run_scanned if c.scan_layers else self._run_loop
    x, kv, hidden = run(x, positions, k_positions, attn_mask, schedule, kv, index, return_hidden)
    if decode:
      commit(kv)
    return self.final_norm(x), hidden

  def __call__(self, tokens, positions=None, attn_mask=None, *, embedded_prefix=None,
               decode: bool = False, return_hidden: bool = False):
    """Logits (B, T, V) float32 over `tokens` (B, T'), after an optional unscaled
    `embedded_prefix` (B, T - T', D). Positions default to 0..T-1 and the mask to causal.
    Returns (logits, {"pre_logits", "hidden"}) (hidden only with `return_hidden`)."""
    x = self.embed_tokens(tokens)
    if embedded_prefix is not None:
      x = jnp.concatenate([embedded_prefix.astype(x.dtype), x], axis=1)
    b, t = x.shape[:2]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if attn_mask is None:
      attn_mask = masks.causal_mask(b, t)
    pre_logits, hidden = self.transform(x, positions, attn_mask, decode=decode,
                                        return_hidden=return_hidden)
    out = {"pre_logits": pre_logits}
    if return_hidden:
      out["hidden"] = hidden
    return self.compute_logits(pre_logits), out

  # ---------------------------------------------------------------- internals
  def _cache(self, b, t, s, positions):
    """Reads (creating on first use) the cache; returns its pieces and a function storing the
    updated k/v once the layers ran."""
    c = self.config
    shape = (c.depth, b, s, c.num_kv_heads, c.head_dim)
    if not self.has_variable("cache", "k"):
      zeros = jnp.zeros(shape, jnp.dtype(c.dtype))
      for name, value in (("k", zeros), ("v", zeros), ("positions", jnp.zeros((b, s), jnp.int32)),
                          ("index", jnp.zeros((), jnp.int32))):
        self.put_variable("cache", name, value)
    k, v = self.get_variable("cache", "k"), self.get_variable("cache", "v")
    if k.shape != shape:
      raise ValueError(f"the cache holds {k.shape[2]} slots for batch {k.shape[1]}, but the mask "
                       f"asks for {s} slots and batch {b}")
    index = self.get_variable("cache", "index")
    k_positions = jax.lax.dynamic_update_slice(self.get_variable("cache", "positions"),
                                               positions.astype(jnp.int32), (0, index))
    self.put_variable("cache", "positions", k_positions)

    def commit(kv):
      self.put_variable("cache", "k", kv[0])
      self.put_variable("cache", "v", kv[1])
      self.put_variable("cache", "index", index + t)

    return (k, v), index, k_positions, commit

  def _run_loop(self, x, positions, k_positions, mask, schedule, kv, index, return_hidden):
    hidden = [x]
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks):
      layer = {name: values[i] for name, values in schedule.items()}
      layer_kv = None if kv is None else (kv[0][i], kv[1][i])
      x, layer_kv = block(x, positions, k_positions, mask, layer, layer_kv, index)
      hidden.append(x)
      if kv is not None:
        new_k.append(layer_kv[0])
        new_v.append(layer_kv[1])
    kv = None if kv is None else (jnp.stack(new_k), jnp.stack(new_v))
    return x, kv, (jnp.stack(hidden) if return_hidden else None)

  def _run_scanned(self, x, positions, k_positions, mask, schedule, kv, index, return_hidden):
    apply_block = self._unbound_block().apply

    def body(h, xs):
      params, layer, layer_kv = xs
      h, layer_kv = apply_block({"params": params}, h, positions, k_positions, mask, layer,
                                layer_kv, index)
      return h, (layer_kv, h if return_hidden else None)

    policy = remat_policy(self.config.remat_policy)
    if policy is not None:
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    out, (kv, hs) = jax.lax.scan(body, x, (self.layers, schedule, kv))
    hidden = jnp.concatenate([x[None], hs]) if return_hidden else None
    return out, kv, hidden

  def _unbound_block(self):
    # parent=None: a free-standing block whose params the scan passes in explicitly.
    return Block(self.config, parent=None)

  def _init_stacked(self, rng):
    """All blocks' params stacked on axis 0, with the logical axis name "layers" prepended."""
    c = self.config
    x = jnp.zeros((1, 1, c.width), jnp.dtype(c.dtype))
    pos = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1), bool)
    layer = jax.tree.map(lambda a: jnp.asarray(a[0]), C.layer_schedule(c))
    init_one = lambda key: self._unbound_block().init(key, x, pos, pos, mask, layer)["params"]
    return P.add_layers_axis(jax.vmap(init_one)(jax.random.split(rng, c.depth)))


Decoder = GemmaDecoder  # the same module for every family (Qwen2, Llama: config data)
