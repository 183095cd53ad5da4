"""Image generation (spec D.3): the LLM walks the N image positions with its KV cache, both
visual heads sample their D codes over depth, classifier-free guidance at every depth step.

One jitted function samples whole images: a `lax.fori_loop` over positions (no Python loop
per position), the D depth steps of each head unrolled inside it.

At image position p (hidden state h_p: the `<image_gen_start>` token's for p = 1, else the
previous image position's):
  1. the pixel head samples y_{p,1..D} and the semantic head z_{p,1..D}, each over depth
     (`sample_head`), independently given h_p;
  2. the next input is the understanding projector applied to the dual-token visual vector
     of the sampled codes (`[sum_d e_pix(y); sum_d e_sem(z)]`, or the post-quant features);
  3. that embedding is appended to the cache, giving h_{p+1}.
After N positions only the pixel codes are decoded to pixels (`DualToken.decode_codes`).

Classifier-free guidance — how the batch is laid out (VILA-U's scheme, made explicit):
  rows [0, B)    the conditional prompts (the captions), one row per image to generate;
  rows [B, 2B)   the unconditional prompts (the same template with an empty caption), row
                 B + i pairing with row i.
Both halves run through the LLM and the heads as one batch of 2B. At every depth step the
logits of row i and row B + i are mixed, `l = l_u + s * (l_c - l_u)`, ONE code is sampled from
`l` per pair, and that code is written into both rows: the two halves see the same image
codes and differ only in their prompt. Without guidance (`guided=False`) the batch is the B
conditional rows alone; s = 1 gives the conditional logits, i.e. unguided sampling.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dualtoken_jax.models import config as model_config
from dualtoken_jax.llm import decoding, masks, sampling
from dualtoken_jax.mllm import projector as V
from dualtoken_jax.mllm.model import DualTokenMLLM
from dualtoken_jax.models.dualtoken import DualToken


def guide(logits, scale):
  """(2B, K) logits of [conditional; unconditional] rows -> (B, K) guided logits."""
  b = logits.shape[0] // 2
  conditional, unconditional = logits[:b], logits[b:]
  return unconditional + scale * (conditional - unconditional)


def sample_head(model: DualTokenMLLM, params, branch: str, hidden, codebook, rng, *,
                guided: bool, cfg_scale, temperature, top_k, top_p):
  """One head's D codes for each position: hidden (R, D_llm) (R = 2B when guided) -> (B, D)
  int32 codes, sampled depth by depth from the head's causal transformer."""
  apply = lambda method, *args: model.apply({"params": params}, branch, *args, method=method)
  first = apply(DualTokenMLLM.head_first_input, hidden)                     # (R, W)
  depth = model.config.tokenizer["vq_pix" if branch == "pixel" else "vq_sem"].depth
  inputs = jnp.zeros((first.shape[0], depth, first.shape[-1]), first.dtype).at[:, 0].set(first)
  cumulative = jnp.zeros((first.shape[0], codebook.shape[-1]), jnp.float32)
  codes = []
  for d, key in enumerate(jax.random.split(rng, depth)):
    logits = apply(DualTokenMLLM.head_logits_from_inputs, inputs)[:, d]    # (R, K)
    if guided:
      logits = guide(logits, cfg_scale)
    code = sampling.sample(logits, key, temperature, top_k, top_p)          # (B,)
    codes.append(code)
    vector = jnp.take(codebook, code, axis=0).astype(jnp.float32)
    cumulative = cumulative + (jnp.concatenate([vector, vector]) if guided else vector)
    if d + 1 < depth:
      inputs = inputs.at[:, d + 1].set(
          apply(DualTokenMLLM.head_code_input, cumulative, d + 1).astype(inputs.dtype))
  return jnp.stack(codes, axis=-1)


def _visual_vector(model, tokenizer, tokenizer_variables, pix, sem, p):
  """(B, C) visual vector of position p from the code buffers (B, N, D) (positions > p are
  still zeros: the post-quant blocks are causal, so they do not affect position p)."""
  config = model.config
  if config.visual_vector == "code_embeddings":
    e_pix, e_sem = tokenizer.apply(tokenizer_variables, pix[:, p], sem[:, p],
                                   method=DualToken.code_embeddings)
    return jnp.concatenate([e_pix, e_sem], axis=-1).astype(jnp.float32)
  g = model_config.grid_size(config.tokenizer)
  grid = lambda c: c.reshape(c.shape[0], g, g, c.shape[-1])
  return V.visual_vectors(tokenizer, tokenizer_variables, grid(pix), grid(sem), "postquant")[:, p]


@functools.partial(jax.jit, static_argnames=("model", "decoder", "tokenizer", "guided"))
def sample_codes(model: DualTokenMLLM, decoder, tokenizer: DualToken, params,
                 tokenizer_variables, prompt, prompt_mask, prompt_mask_ar, rng, *,
                 guided: bool, cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0):
  """Samples the codes of B images.

  Args:
    model, decoder, tokenizer: the MLLM module, its `llm_module` and the tokenizer module.
    params, tokenizer_variables: MLLM params ({"llm", "projector", "gen_*"}) and the frozen
      tokenizer's variables.
    prompt: (R, P) int32 prompts ending in `<image_gen_start>` (right-padded), R = 2B laid
      out [conditional; unconditional] when `guided` (module docstring), else R = B.
    prompt_mask: (R, P) bool real tokens; prompt_mask_ar: (R, P) PaliGemma mask_ar.
    rng: PRNG key; the same key gives the same images.
    cfg_scale, temperature, top_k, top_p: traced (changing them does not recompile).

  Returns:
    (pixel codes (B, g, g, D_pix), semantic codes (B, g, g, D_sem)), int32.
  """
  config = model.config
  g = model_config.grid_size(config.tokenizer)
  n = g * g
  rows, p_len = prompt.shape
  b = rows // 2 if guided else rows
  llm = params["llm"]
  x = model.apply({"params": params}, prompt, jnp.zeros(prompt.shape, bool), None,
                  method=DualTokenMLLM.embed)
  attn = masks.make_attn_mask(prompt_mask, prompt_mask_ar)
  pre, cache = decoding.prefill(decoder, llm, x, prompt_mask, p_len + n, attn)
  hidden = pre[jnp.arange(rows), decoding.last_valid_index(prompt_mask)]
  lengths = prompt_mask.sum(axis=1).astype(jnp.int32)
  valid = jnp.concatenate([prompt_mask, jnp.zeros((rows, n), bool)], axis=1)
  codebook_pix, codebook_sem = tokenizer.apply(tokenizer_variables, method=DualToken.codebooks)
  t = config.tokenizer
  pix = jnp.zeros((b, n, t.vq_pix.depth), jnp.int32)
  sem = jnp.zeros((b, n, t.vq_sem.depth), jnp.int32)
  options = dict(guided=guided, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                 top_p=top_p)

  def position(p, carry):
    hidden, cache, valid, pix, sem, rng = carry
    rng, key_pix, key_sem = jax.random.split(rng, 3)
    pix = pix.at[:, p].set(sample_head(model, params, "pixel", hidden, codebook_pix, key_pix,
                                       **options))
    sem = sem.at[:, p].set(sample_head(model, params, "semantic", hidden, codebook_sem,
                                       key_sem, **options))
    vector = _visual_vector(model, tokenizer, tokenizer_variables, pix, sem, p)
    e = model.apply({"params": params}, vector, method=DualTokenMLLM.project).astype(x.dtype)
    e = jnp.concatenate([e, e]) if guided else e
    valid = valid.at[:, p_len + p].set(True)
    pre, cache = decoding.extend(decoder, llm, cache, e[:, None], (lengths + p)[:, None],
                                 masks.decode_step_mask(valid, p_len + p))
    return pre[:, 0], cache, valid, pix, sem, rng

  carry = jax.lax.fori_loop(0, n, position, (hidden, cache, valid, pix, sem, rng))
  pix, sem = carry[3], carry[4]
  return pix.reshape(b, g, g, -1), sem.reshape(b, g, g, -1)


@functools.partial(jax.jit, static_argnames=("tokenizer",))
def decode_pixels(tokenizer: DualToken, tokenizer_variables, codes_pix):
  """Pixel codes (B, g, g, D) -> images (B, H, W, 3) in [-1, 1]."""
  images = tokenizer.apply(tokenizer_variables, codes_pix, method=DualToken.decode_codes)
  return jnp.clip(images, -1.0, 1.0)
