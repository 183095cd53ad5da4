"""The unified DualToken MLLM in Linen: projector + Gemma decoder, the tokenizer kept frozen.

Parameter tree (`params`):

  llm/...          exactly a `GemmaDecoder`'s tree (official Gemma names, `embedder/
                   input_embedding`, `layer_{i}/attn/q_einsum/w`, or `layers/...` when
                   scanned), so `GemmaLM(config.llm, params["llm"])` exports it to HF or Orbax
                   and the bridges load checkpoints straight into it (`mllm.state`)
  projector/fc1, projector/fc2   the understanding projector (`projector.Projector`)
  gen_pixel/..., gen_semantic/...   the two visual heads of generation (`depth_head.DepthHead`,
                   each with its own projector `proj/fc1|fc2` from the LLM width)

The tokenizer is not part of this module: its variables are a separate, frozen part of the
training state, applied outside the differentiated function (`projector.visual_vectors`), so
no gradient or optimiser state is ever computed for it. The heads read `hidden_states`'
output at the position before each generated image position (`head_logits`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from dualtoken_jax.llm import masks
from dualtoken_jax.llm.gemma import GemmaDecoder, frozen
from dualtoken_jax.mllm import config as C
from dualtoken_jax.mllm.depth_head import DepthHead
from dualtoken_jax.mllm.projector import Projector, gather_image_embeddings
from dualtoken_jax.models.dualtoken import DualToken


def frozen_model_config(config) -> ml_collections.FrozenConfigDict:
  if isinstance(config, ml_collections.FrozenConfigDict):
    return config
  C.validate_model(config)
  return ml_collections.FrozenConfigDict(config)


def tokenizer_module(config) -> DualToken:
  """The (frozen) tokenizer the MLLM config describes."""
  return DualToken(ml_collections.FrozenConfigDict(config.tokenizer))


def llm_module(config) -> GemmaDecoder:
  """A standalone decoder whose params are `params["llm"]` (for cached decoding, export)."""
  return GemmaDecoder(frozen(config.llm))


class DualTokenMLLM(nn.Module):
  config: Any  # frozen model config (see `frozen_model_config`)

  def setup(self):
    c = self.config
    self.llm = GemmaDecoder(frozen(c.llm))
    self.projector = Projector(C.projector_hidden(c), c.llm.width, dtype=jnp.dtype(c.llm.dtype),
                               param_dtype=jnp.dtype(c.llm.param_dtype))
    head = lambda q, name: DepthHead(
        q.codebook_size, q.depth, C.head_width(c), C.head_count(c), c.heads.num_layers,
        c.heads.mlp_ratio, c.heads.dropout, dtype=jnp.dtype(c.llm.dtype), name=name)
    self.gen_pixel = head(c.tokenizer.vq_pix, "gen_pixel")
    self.gen_semantic = head(c.tokenizer.vq_sem, "gen_semantic")

  def head(self, branch: str) -> DepthHead:
    """"pixel" or "semantic"."""
    return {"pixel": self.gen_pixel, "semantic": self.gen_semantic}[branch]

  def embed(self, tokens, image_mask, visual):
    """Input embeddings (B, L, D): token embeddings x sqrt(D), and at `image_mask` positions
    the projected `visual` vectors (B, N, C) in order (not scaled)."""
    x = self.llm.embed_tokens(tokens)
    if visual is None:
      return x
    return gather_image_embeddings(x, self.projector(visual), image_mask)

  def hidden_states(self, tokens, image_mask, visual, input_mask, mask_ar):
    """Final-normed decoder states (B, L, D) of a full (training) pass."""
    x = self.embed(tokens, image_mask, visual)
    positions = masks.positions_from_mask(input_mask)
    attn_mask = masks.make_attn_mask(input_mask, mask_ar)
    pre_logits, _ = self.llm.transform(x, positions, attn_mask)
    return pre_logits

  def logits(self, pre_logits):
    """(..., D) states -> float32 logits over the vocabulary (tied table, soft-capped)."""
    return self.llm.compute_logits(pre_logits)

  def project(self, visual):
    """Visual vectors (..., C) -> LLM input embeddings (..., D)."""
    return self.projector(visual)

  def head_logits(self, branch: str, hidden, code_embeddings, deterministic: bool = True):
    """Teacher-forced code logits (..., D, K) of one head (see `DepthHead.__call__`)."""
    return self.head(branch)(hidden, code_embeddings, deterministic)

  def head_first_input(self, branch: str, hidden):
    return self.head(branch).first_input(hidden)

  def head_code_input(self, branch: str, cumulative, d: int):
    return self.head(branch).code_input(cumulative, d)

  def head_logits_from_inputs(self, branch: str, x):
    return self.head(branch).logits_from_inputs(x, deterministic=True)

  def __call__(self, tokens, image_mask, visual, input_mask, mask_ar):
    """Logits (B, L, V) float32: position t predicts token t + 1."""
    return self.logits(self.hidden_states(tokens, image_mask, visual, input_mask, mask_ar))

  def initialize(self, tokens, image_mask, visual, input_mask, mask_ar):
    """Touches every submodule (for `init`): the decoder, the projector and both heads."""
    pre = self.hidden_states(tokens, image_mask, visual, input_mask, mask_ar)
    t = self.config.tokenizer
    for branch, q in (("pixel", t.vq_pix), ("semantic", t.vq_sem)):
      self.head_logits(branch, pre[:, 0], jnp.zeros(pre.shape[:1] + (q.depth, q.embed_dim)))
    return self.logits(pre)


def dummy_inputs(config, batch: int = 1, length: int | None = None):
  """Zero inputs of the right shapes for `init` / `eval_shape`."""
  n = C.num_image_positions(config)
  length = length or n + 2
  tokens = jnp.zeros((batch, length), jnp.int32)
  mask = jnp.ones((batch, length), bool)
  visual = jnp.zeros((batch, n, C.visual_dim(config)), jnp.float32)
  image_mask, mask_ar = jnp.zeros((batch, length), bool), jnp.ones((batch, length), jnp.int32)
  return tokens, image_mask, visual, mask, mask_ar
