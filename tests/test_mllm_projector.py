"""Dual-token visual input: both visual-vector choices against the tokenizer's public API,
images vs pre-computed codes, causality of the post-quant path, the GELU projector, and how
image embeddings enter the decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import mllm_testdata as T
from dualtoken_jax import config_files
from dualtoken_jax.data import load_image
from dualtoken_jax.mllm import config as C
from dualtoken_jax.mllm import model as M
from dualtoken_jax.mllm import projector as V
from dualtoken_jax.models.dualtoken import DualToken
from dualtoken_jax.tokenizer import DualTokenizer, DualTokens


@pytest.fixture(scope="module")
def tok():
  return DualTokenizer.from_pretrained(T.tokenizer_dir())


@pytest.fixture(scope="module")
def images():
  return np.stack([load_image(p, 32) for p in list(T.photos().values())[:3]])


visual_vectors = jax.jit(V.visual_vectors, static_argnums=(0, 4))
encode_codes = jax.jit(V.encode_codes, static_argnums=0)


def config(visual="code_embeddings"):
  return config_files.load(f"mllm_tiny:visual={visual}").model


def test_code_embeddings_are_the_tokenizers_sums_concatenated(tok, images):
  codes = tok.encode(images)
  pix, sem = tok.code_embeddings(codes)
  got = visual_vectors(tok.model, tok.variables, codes.pixel, codes.semantic, "code_embeddings")
  assert got.shape == (3, 16, C.visual_dim(config())) == (3, 16, 16)
  np.testing.assert_array_equal(got, np.concatenate([np.reshape(pix, (3, 16, 8)),
                                                     np.reshape(sem, (3, 16, 8))], -1))
  # The images give different visual vectors (the task below is not trivial).
  assert not np.allclose(got[0], got[1])


def test_postquant_vectors_are_the_post_quant_blocks_and_causal(tok, images):
  codes = tok.encode(images)
  got = visual_vectors(tok.model, tok.variables, codes.pixel, codes.semantic, "postquant")
  assert got.shape == (3, 16, C.visual_dim(config("postquant"))) == (3, 16, 128)
  # Semantic half: the tokenizer's own semantic_from_codes, and (as the encoder computes it)
  # the post-quant output of the quantised vectors.
  sem = tok.model.apply(tok.variables, codes.semantic, method=DualToken.semantic_from_codes)
  np.testing.assert_allclose(got[..., 64:], sem, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[..., 64:], tok.semantic_features(images), rtol=1e-4, atol=1e-4)
  pix_sum = np.reshape(tok.code_embeddings(codes)[0], (3, 16, 8))
  pix = tok.model.apply(tok.variables, pix_sum, method=lambda m, z: m.postquant_pix(z))
  np.testing.assert_allclose(got[..., :64], pix, rtol=1e-5, atol=1e-5)
  # Causal in raster order: changing the codes of positions >= 5 leaves 0..4 unchanged.
  flat = lambda c: c.reshape(3, 16, -1)
  later = DualTokens(pixel=flat(codes.pixel).at[:, 5:].set(7).reshape(codes.pixel.shape),
                     semantic=flat(codes.semantic).at[:, 5:].set(9).reshape(codes.semantic.shape))
  changed = visual_vectors(tok.model, tok.variables, later.pixel, later.semantic, "postquant")
  np.testing.assert_allclose(changed[:, :5], got[:, :5], rtol=1e-5, atol=1e-6)
  assert not np.allclose(changed[:, 5:], got[:, 5:])


@pytest.mark.parametrize("visual", C.VISUAL_VECTORS)
def test_images_in_the_step_equal_precomputed_codes(tok, images, visual):
  from_images = visual_vectors(tok.model, tok.variables,
                                 *encode_codes(tok.model, tok.variables, jnp.asarray(images)),
                                 visual)
  codes = tok.encode(images)
  from_codes = visual_vectors(tok.model, tok.variables, codes.pixel, codes.semantic, visual)
  np.testing.assert_array_equal(from_images, from_codes)


def test_projector_is_two_dense_layers_with_exact_gelu():
  proj = V.Projector(hidden_dim=24, out_dim=10)
  x = jax.random.normal(jax.random.key(0), (2, 5, 6))
  params = proj.init(jax.random.key(1), x)["params"]
  assert sorted(params) == ["fc1", "fc2"] and params["fc1"]["kernel"].names == (None, "mlp")
  p = jax.tree.map(np.asarray, jax.tree.map(lambda b: b.value, params,
                                            is_leaf=lambda b: hasattr(b, "value")))
  p["fc1"]["bias"] = np.linspace(-1, 1, 24, dtype=np.float32)
  p["fc2"]["bias"] = np.linspace(0, 2, 10, dtype=np.float32)
  h = np.asarray(x) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  expected = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  np.testing.assert_allclose(proj.apply({"params": p}, x), expected, rtol=1e-5, atol=1e-5)
  # The default hidden width is the LLM width (the paper's 2048 -> 2048 -> 2048).
  assert C.projector_hidden(config()) == config().llm.width


def test_gather_puts_image_embeddings_at_image_positions():
  tokens = jnp.arange(2 * 6 * 3, dtype=jnp.float32).reshape(2, 6, 3)
  images = -1 - jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 3)
  mask = jnp.array([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)  # row 1: text only
  out = np.asarray(V.gather_image_embeddings(tokens, images, mask))
  expected = np.array(tokens)
  expected[0, 1:3] = images[0]
  np.testing.assert_array_equal(out, expected)


def test_image_embeddings_enter_unscaled_and_tokens_scaled():
  model_config = config()
  model = M.DualTokenMLLM(M.frozen_model_config(model_config))
  tokens, image_mask, visual, input_mask, mask_ar = M.dummy_inputs(model_config, 1, 20)
  image_mask = image_mask.at[:, 2:18].set(True)
  visual = jax.random.normal(jax.random.key(2), visual.shape)
  tokens = tokens.at[:, 0].set(5)
  params = jax.jit(model.init)(jax.random.key(0), tokens, image_mask, visual, input_mask,
                               mask_ar)["params"]
  embed = jax.jit(lambda p: (model.apply({"params": p}, tokens, image_mask, visual,
                                         method=M.DualTokenMLLM.embed),
                             model.apply({"params": p}, visual, method=lambda m, v: m.projector(v))))
  x, projected = embed(params)
  np.testing.assert_allclose(x[:, 2:18], projected, rtol=1e-6)
  table = np.asarray(params["llm"]["embedder"]["input_embedding"].value)
  np.testing.assert_allclose(x[0, 0], table[5] * np.sqrt(64), rtol=1e-6)
  assert C.num_image_positions(model_config) == 16
