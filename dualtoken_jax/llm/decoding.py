"""KV-cached decoding: prefill, one-token extension, and a jitted sampling loop.

The cache has a fixed number of slots S (static shapes under jit). All rows write the same slot
at each step; each row keeps its own RoPE positions and its own mask of valid slots, so prompts
padded on the left or on the right (or with holes) decode exactly like unpadded ones.
The loop is a `lax.while_loop` (no Python loop per token) that ends early once every row has
emitted an end-of-sequence token; later tokens are `pad_id`. `stream` is the same loop stepped
from Python, yielding each token as it is sampled (for a chat that shows the answer being written).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualtoken_jax.llm import masks
from dualtoken_jax.llm import sampling
from dualtoken_jax.llm.gemma import GemmaDecoder


def prefill(model: GemmaDecoder, params, x, input_mask, cache_size: int, attn_mask=None):
  """Runs embeddings `x` (B, T, D) through a fresh cache of `cache_size` slots (slots [0, T)).

  `input_mask` (B, T) marks real tokens. `attn_mask` (B, T, T) defaults to causal over them;
  pass e.g. `masks.make_attn_mask(input_mask, mask_ar)` for a bidirectional (image) prefix.
  Returns (pre_logits (B, T, D), cache).
  """
  input_mask = jnp.asarray(input_mask, bool)
  positions = masks.positions_from_mask(input_mask)
  if attn_mask is None:
    attn_mask = masks.causal_padding_mask(input_mask)
  mask = masks.pad_keys(attn_mask, cache_size)
  (pre_logits, _), state = model.apply({"params": params}, x, positions, mask, decode=True,
                                       method=GemmaDecoder.transform, mutable=["cache"])
  return pre_logits, state["cache"]


def extend(model: GemmaDecoder, params, cache, x, positions, attn_mask):
  """Appends embeddings `x` (B, T, D) at the cache's write index. `attn_mask` (B, T, S) is over
  cache slots. Returns (pre_logits (B, T, D), new cache)."""
  (pre_logits, _), state = model.apply({"params": params, "cache": cache}, x, positions,
                                       attn_mask, decode=True, method=GemmaDecoder.transform,
                                       mutable=["cache"])
  return pre_logits, state["cache"]


def embed(model: GemmaDecoder, params, tokens):
  return model.apply({"params": params}, tokens, method=GemmaDecoder.embed_tokens)


def logits_of(model: GemmaDecoder, params, pre_logits):
  return model.apply({"params": params}, pre_logits, method=GemmaDecoder.compute_logits)


def last_valid_index(input_mask):
  """(B, T) -> (B,) index of each row's last True entry."""
  t = input_mask.shape[1]
  return t - 1 - jnp.argmax(input_mask[:, ::-1], axis=1)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "return_logits"))
def generate(model: GemmaDecoder, params, prompt, prompt_mask, rng, *, max_new_tokens: int,
             temperature=0.0, top_k=0, top_p=1.0, eos_ids=(), pad_id=0,
             return_logits: bool = False, prompt_embeddings=None, prompt_attn_mask=None):
  """Samples `max_new_tokens` after each prompt row.

  Args:
    model, params: the decoder and its params.
    prompt: (B, P) int tokens; `prompt_mask` (B, P) bool marks real ones (padding anywhere).
    rng: a PRNG key (unused when greedy).
    temperature, top_k, top_p: as in `sampling.sample` (0 is greedy; top_k 0 and top_p 1 are
      off). Like `eos_ids` and `pad_id` they are traced: changing them does not recompile.
    eos_ids: a row stops after emitting one of these; its remaining tokens are `pad_id`.
    return_logits: also return the (B, max_new_tokens, V) float32 logits each new token was
      drawn from (before temperature and filters; zeros after an early stop).
    prompt_embeddings: (B, P, D) input embeddings of the prompt, used instead of embedding
      `prompt` (e.g. with projected image features at some positions, not scaled).
    prompt_attn_mask: (B, P, P) prefill mask (e.g. `masks.make_attn_mask` for a prefix-LM
      prompt); default causal over the valid tokens. New tokens are always causal.

  Returns:
    (B, P + max_new_tokens) int32: the prompt as given, then the new tokens (and the logits).
  """
  b, p = prompt.shape
  g = max_new_tokens
  prompt_mask = jnp.asarray(prompt_mask, bool)
  lengths = prompt_mask.sum(axis=1).astype(jnp.int32)
  x = embed(model, params, prompt) if prompt_embeddings is None else prompt_embeddings
  pre, cache = prefill(model, params, x, prompt_mask, p + g, prompt_attn_mask)
  logits = logits_of(model, params, pre[jnp.arange(b), last_valid_index(prompt_mask)])
  tokens = jnp.concatenate([prompt.astype(jnp.int32), jnp.full((b, g), pad_id, jnp.int32)], 1)
  valid = jnp.concatenate([prompt_mask, jnp.zeros((b, g), bool)], axis=1)
  done = jnp.zeros((b,), bool)
  eos = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
  scores = jnp.zeros((b, g, logits.shape[-1]), jnp.float32) if return_logits else None

  def feed(t, token, cache, valid):
    """Runs the token sampled at step t (slot p + t) and returns the next logits."""
    x = embed(model, params, token[:, None])
    positions = (lengths + t)[:, None]
    pre, cache = extend(model, params, cache, x, positions, masks.decode_step_mask(valid, p + t))
    return logits_of(model, params, pre[:, 0]), cache

  def body(carry):
    t, tokens, logits, cache, valid, done, rng, scores = carry
    if return_logits:
      scores = jax.lax.dynamic_update_slice(scores, logits[:, None], (0, t, 0))
    rng, key = jax.random.split(rng)
    token = sampling.sample(logits, key, temperature, top_k, top_p)
    token = jnp.where(done, pad_id, token)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, p + t))
    valid = jax.lax.dynamic_update_slice(valid, jnp.ones((b, 1), bool), (0, p + t))
    done = done | jnp.isin(token, eos)
    logits, cache = jax.lax.cond(t + 1 < g, feed, lambda t, token, cache, valid: (logits, cache),
                                 t, token, cache, valid)
    return t + 1, tokens, logits, cache, valid, done, rng, scores

  def cond(carry):
    t, done = carry[0], carry[5]
    return (t < g) & ~jnp.all(done)

  carry = (jnp.zeros((), jnp.int32), tokens, logits, cache, valid, done, rng, scores)
  carry = jax.lax.while_loop(cond, body, carry)
  return (carry[1], carry[7]) if return_logits else carry[1]


def stream(model: GemmaDecoder, params, prompt, prompt_mask, rng, *, max_new_tokens: int,
           temperature=0.0, top_k=0, top_p=1.0, eos_ids=(), pad_id=0, prompt_embeddings=None,
           prompt_attn_mask=None):
  """`generate`, one token at a time: yields each step's new tokens, (B,) int32 numpy, as soon
  as they are sampled (to show an answer while it is written), until every row has emitted an
  EOS id or `max_new_tokens` are out. The same prefill, per-step key split, sampling and masks
  as `generate`'s loop, so the same arguments give the same tokens; each step is one jitted
  call (the sampling options are traced, as there)."""
  b, p = prompt.shape
  g = int(max_new_tokens)
  prompt_mask = jnp.asarray(prompt_mask, bool)
  logits, cache = _stream_prefill(model, params, prompt, prompt_mask, p + g, prompt_embeddings,
                                  prompt_attn_mask)
  lengths = prompt_mask.sum(axis=1).astype(jnp.int32)
  valid = jnp.concatenate([prompt_mask, jnp.zeros((b, g), bool)], axis=1)
  done = np.zeros((b,), bool)
  eos = np.asarray(eos_ids, np.int32).reshape(-1)
  options = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
  for t in range(g):
    rng, token = _stream_sample(logits, rng, *options)
    token = np.where(done, np.int32(pad_id), np.asarray(token))
    yield token
    done = done | np.isin(token, eos)
    if t + 1 == g or done.all():
      return
    valid = valid.at[:, p + t].set(True)
    logits, cache = _stream_feed(model, params, cache, jnp.asarray(token), lengths + t, valid,
                                 jnp.int32(p + t))


@functools.partial(jax.jit, static_argnames=("model", "cache_size"))
def _stream_prefill(model, params, prompt, prompt_mask, cache_size, prompt_embeddings,
                    prompt_attn_mask):
  x = embed(model, params, prompt) if prompt_embeddings is None else prompt_embeddings
  pre, cache = prefill(model, params, x, prompt_mask, cache_size, prompt_attn_mask)
  b = prompt.shape[0]
  return logits_of(model, params, pre[jnp.arange(b), last_valid_index(prompt_mask)]), cache


@jax.jit
def _stream_sample(logits, rng, temperature, top_k, top_p):
  rng, key = jax.random.split(rng)
  return rng, sampling.sample(logits, key, temperature, top_k, top_p)


@functools.partial(jax.jit, static_argnames=("model",))
def _stream_feed(model, params, cache, token, positions, valid, slot):
  x = embed(model, params, token[:, None])
  pre, cache = extend(model, params, cache, x, positions[:, None],
                      masks.decode_step_mask(valid, slot))
  return logits_of(model, params, pre[:, 0]), cache


def init_cache(config, batch: int, size: int) -> dict:
  """An empty cache of `size` slots, as `prefill` would create it (to extend from slot 0)."""
  kv = jnp.zeros((config.depth, batch, size, config.num_kv_heads, config.head_dim),
                 jnp.dtype(config.dtype))
  return {"k": kv, "v": kv, "positions": jnp.zeros((batch, size), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


def default_prompt_mask(prompt, pad_id: Any = None):
  """All True, or `prompt != pad_id` when a pad id is given."""
  prompt = jnp.asarray(prompt)
  return jnp.ones(prompt.shape, bool) if pad_id is None else prompt != pad_id
