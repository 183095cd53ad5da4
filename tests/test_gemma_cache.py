"""KV-cached decoding: teacher forcing against the full forward, HF greedy sequences, padded
batches, sampling."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualtoken_jax.llm import GemmaLM
from dualtoken_jax.llm import decoding
from dualtoken_jax.llm import masks
from dualtoken_jax.llm import sampling

GEMMA = pathlib.Path(__file__).parent / "fixtures" / "gemma"
FAMILIES = ("gemma2", "gemma3")


@pytest.fixture(scope="module")
def fixtures():
  return {f: (GemmaLM.from_hf(GEMMA / f), dict(np.load(GEMMA / f / "golden.npz")))
          for f in FAMILIES}


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced_logits(model, params, tokens):
  """Feeds `tokens` one at a time through an empty cache of T slots; returns the (B, T, V)
  logits the cache produced at every position."""
  b, t = tokens.shape
  valid = jnp.ones((b, t), bool)

  def step(cache, i):
    token = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)
    pre, cache = decoding.extend(model, params, cache, decoding.embed(model, params, token),
                                 jnp.full((b, 1), i), masks.decode_step_mask(valid, i))
    return cache, pre[:, 0]

  cache, steps = jax.lax.scan(step, decoding.init_cache(model.config, b, t), jnp.arange(t))
  return decoding.logits_of(model, params, jnp.swapaxes(steps, 0, 1)), cache["index"]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_matches_full_forward(fixtures, family):
  lm, golden = fixtures[family]
  logits, index = _teacher_forced_logits(lm.model, lm.params, jnp.asarray(golden["tokens"]))
  assert int(index) == golden["tokens"].shape[1]
  np.testing.assert_allclose(logits, golden["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_hf(fixtures, family):
  lm, golden = fixtures[family]
  out = lm.generate(golden["prompt"], max_new_tokens=8)
  np.testing.assert_array_equal(out, golden["greedy"])


def test_padded_prompts_generate_like_unpadded(fixtures):
  """Left- and right-padded copies of one prompt decode exactly as the unpadded prompt: each
  step's logits equal the full (uncached) forward over the unpadded sequence."""
  lm, golden = fixtures["gemma2"]
  short = golden["prompt"][1, :9]
  pad = lm.config.pad_id
  prompt = np.array([[pad] * 3 + list(short), list(short) + [pad] * 3], np.int32)  # left, right
  mask = np.array([[False] * 3 + [True] * 9, [True] * 9 + [False] * 3])
  out, step_logits = lm.generate(prompt, max_new_tokens=8, prompt_mask=mask, return_logits=True)
  out = np.asarray(out)
  np.testing.assert_array_equal(out[:, :12], prompt)
  np.testing.assert_array_equal(out[0, 12:], out[1, 12:])
  # Reference: the unpadded sequence (prompt then the generated tokens), uncached. Row 0 of a
  # (2, 20) buffer; positions past 17 are never seen by earlier ones (causal).
  sequence = np.zeros((2, 20), np.int32)
  sequence[:, :17] = np.concatenate([short, out[0, 12:]])
  full = np.asarray(lm.logits(sequence))[0, 8:16]
  np.testing.assert_allclose(step_logits[0], full, atol=1e-4, rtol=0)
  np.testing.assert_allclose(step_logits[1], full, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(out[0, 12:], np.argmax(full, axis=-1))
  # The pad id alone also marks padding.
  np.testing.assert_array_equal(lm.generate(prompt, max_new_tokens=8, pad_id=pad), out)


def test_left_padded_logits_equal_unpadded(fixtures):
  lm, golden = fixtures["gemma3"]
  tokens = np.array(golden["tokens"])
  tokens[1] = np.concatenate([[lm.config.pad_id] * 3, golden["tokens"][1, :17]])
  mask = np.ones_like(tokens, bool)
  mask[1, :3] = False
  logits = np.asarray(lm.logits(tokens, input_mask=mask))
  np.testing.assert_allclose(logits[0], golden["logits"][0], atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits[1, 3:], golden["logits"][1, :17], atol=1e-4, rtol=0)


def test_eos_stops_a_row_and_pads_it(fixtures):
  lm, golden = fixtures["gemma3"]
  # Row 0's greedy continuation is 117 117 ...; stopping at 117 pads the rest.
  out = np.asarray(lm.generate(golden["prompt"], max_new_tokens=8, eos_ids=(117,)))
  np.testing.assert_array_equal(out[0, :13], golden["greedy"][0, :13])
  np.testing.assert_array_equal(out[0, 13:], [lm.config.pad_id] * 7)
  np.testing.assert_array_equal(out[1], golden["greedy"][1])


def test_scanned_model_decodes_like_hf(fixtures):
  loop, golden = fixtures["gemma3"]
  lm = GemmaLM.from_hf(GEMMA / "gemma3", scan_layers=True)
  out, step_logits = lm.generate(golden["prompt"], max_new_tokens=8, return_logits=True)
  np.testing.assert_array_equal(out, golden["greedy"])
  full = np.asarray(loop.logits(golden["greedy"]))[:, 11:19]
  np.testing.assert_allclose(step_logits, full, atol=1e-4, rtol=0)


def test_sampling_is_seeded_and_reproducible(fixtures):
  lm, golden = fixtures["gemma3"]
  sample = functools.partial(lm.generate, golden["prompt"], 8, 2.0, 20, 0.95)
  a, b, c = sample(seed=1), sample(seed=1), sample(seed=2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  np.testing.assert_array_equal(np.asarray(a)[:, :12], golden["prompt"])


def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert kept(sampling.top_k_filter(logits, 2)) == [True, True, False, False, False]
  assert kept(sampling.top_k_filter(logits, 0)) == [True] * 5
  assert kept(sampling.top_p_filter(logits, 0.5)) == [True, False, False, False, False]
  assert kept(sampling.top_p_filter(logits, 0.6)) == [True, True, False, False, False]
  assert kept(sampling.top_p_filter(logits, 0.86)) == [True, True, True, True, False]
  assert kept(sampling.top_p_filter(logits, 1.0)) == [True] * 5
  keys = jax.random.split(jax.random.key(0), 256)
  draws = jax.vmap(lambda k: sampling.sample(logits, k, 1.0, 3, 1.0))(keys)
  assert set(np.unique(draws).tolist()) == {0, 1, 2}
  np.testing.assert_array_equal(sampling.sample(logits, keys[0]), [0])  # temperature 0: argmax
  with pytest.raises(ValueError, match="top_p"):
    sampling.check_options(1.0, None, 0.0)
  with pytest.raises(ValueError, match="top_k"):
    sampling.check_options(1.0, 0, None)
