"""Generation: the depth heads sample what teacher forcing scores, classifier-free guidance with
s = 1 is unguided sampling, seeds reproduce images, prompts end where the image starts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mllm_testdata as T
from dualtoken_jax import config_files
from dualtoken_jax.parallel import sharding
from dualtoken_jax.llm import sampling
from dualtoken_jax.mllm import config as C
from dualtoken_jax.mllm import generation, sequence
from dualtoken_jax.mllm import state as S
from dualtoken_jax.mllm.inference import UnifiedModel
from dualtoken_jax.mllm.depth_head import DepthHead, cross_entropy
from dualtoken_jax.mllm.model import DualTokenMLLM
from dualtoken_jax.training.state import state_layout


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
  """A randomly initialised tiny MLLM behind the public inference API."""
  config = config_files.load("mllm_tiny")
  config.init.tokenizer = T.tokenizer_dir()
  config.init.tokenizer_seed = 1
  modules = S.Modules(config)
  mesh = sharding.single_device_mesh()
  state = modules.create(mesh, state_layout(modules, mesh).shardings)
  spm = T.train_spm(tmp_path_factory.mktemp("spm") / "t.model", T.corpus())
  vocab = sequence.Vocabulary.load(spm, config.model.special_tokens)
  return UnifiedModel(config, state.params, state.tokenizer, vocab)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_incremental_depth_sampling_matches_teacher_forcing(chat, temperature):
  """Sampling depth by depth gives the codes that the teacher-forced logits (fed those same
  codes) select with the same per-depth keys: the head conditions on exactly the codes before
  each depth, in both passes."""
  model, params = chat.model, chat.params
  hidden = jax.random.normal(jax.random.key(0), (5, chat.config.model.llm.width))
  codebook_pix, _ = chat.tokenizer.apply(chat.tokenizer_variables,
                                         method=generation.DualToken.codebooks)
  rng = jax.random.key(7)
  codes = generation.sample_head(model, params, "pixel", hidden, codebook_pix, rng, guided=False,
                                 cfg_scale=1.0, temperature=temperature, top_k=0, top_p=1.0)
  depth = chat.config.model.tokenizer.vq_pix.depth
  assert codes.shape == (5, depth)
  embeddings = jnp.take(codebook_pix, codes, axis=0)                     # (5, D, d)
  logits = model.apply({"params": params}, "pixel", hidden, embeddings,
                       method=DualTokenMLLM.head_logits)                 # (5, D, K)
  for d, key in enumerate(jax.random.split(rng, depth)):
    np.testing.assert_array_equal(
        sampling.sample(logits[:, d], key, temperature, 0, 1.0), codes[:, d], err_msg=f"depth {d}")


def test_depth_head_is_causal_over_depth():
  head = DepthHead(num_codes=11, depth=4, width=16, num_heads=2, num_layers=2, dropout=0.0)
  h = jax.random.normal(jax.random.key(0), (3, 8))
  e = jax.random.normal(jax.random.key(1), (3, 4, 5))
  variables = nn.meta.unbox(head.init(jax.random.key(2), h, e))
  base = head.apply(variables, h, e)
  changed = head.apply(variables, h, e.at[:, 2].add(1.0))  # code at depth 3 (index 2)
  # Depth d's input is the sum of codes before d: changing code 3 affects depth 4 only.
  np.testing.assert_array_equal(base[:, :3], changed[:, :3])
  assert not np.allclose(base[:, 3], changed[:, 3])
  assert set(variables["params"]) >= {"proj", "code_in", "depth_embedding", "block_0",
                                      "final_norm", "classifiers"}
  assert variables["params"]["classifiers"]["kernel"].shape == (4, 16, 11)  # one per depth


def test_code_cross_entropy_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  targets = rng.integers(0, 6, size=(2, 3, 4))
  weights = np.array([1.0, 0.0])[:, None, None]
  loss, acc = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, nll[0].mean(), rtol=1e-5)
  np.testing.assert_allclose(acc, (logits[0].argmax(-1) == targets[0]).mean())


def test_guidance_scale_one_equals_unguided_sampling(chat):
  unguided = chat.generate_images("a photo of a cat", 2, cfg_scale=None, seed=3)
  guided_1 = chat.generate_images("a photo of a cat", 2, cfg_scale=1.0, seed=3)
  guided_3 = chat.generate_images("a photo of a cat", 2, cfg_scale=3.0, seed=3)
  for k in ("codes_pixel", "codes_semantic"):
    np.testing.assert_array_equal(guided_1[k], unguided[k], err_msg=k)
  assert not np.array_equal(guided_3["codes_pixel"], unguided["codes_pixel"])  # guidance acts


def test_fixed_seed_gives_identical_images(chat):
  a = chat.generate_images("draw a rocket", 2, seed=5)
  b = chat.generate_images("draw a rocket", 2, seed=5)
  c = chat.generate_images("draw a rocket", 2, seed=6)
  np.testing.assert_array_equal(a["images"], b["images"])
  np.testing.assert_array_equal(a["codes_semantic"], b["codes_semantic"])
  assert not np.array_equal(a["codes_pixel"], c["codes_pixel"])
  assert not np.array_equal(a["codes_pixel"][0], a["codes_pixel"][1])  # n samples differ
  g = 32 // 8
  assert a["images"].shape == (2, 32, 32, 3) and a["codes_pixel"].shape == (2, g, g, 4)
  assert np.abs(a["images"]).max() <= 1.0


def test_generation_prompt_is_the_training_prefix(chat):
  """The sampler's prompt is exactly the training example up to <image_gen_start>, so the
  hidden state there is the one trained to predict the first image position."""
  vocab, layout = chat.vocab, chat.layout
  example = sequence.build_generation_example(vocab, layout, "a photo of a cat")
  prompt = sequence.build_generation_prompt(vocab, layout, "a photo of a cat")
  n = len(prompt["tokens"])
  np.testing.assert_array_equal(example["tokens"][:n], prompt["tokens"])
  assert prompt["tokens"][-1] == vocab.special[C.GEN_START]
  assert example["gen_mask"].sum() == C.num_image_positions(chat.config.model)
  assert example["gen_mask"][n] and not example["gen_mask"][n - 1]        # image right after
  end = n + C.num_image_positions(chat.config.model)
  assert example["tokens"][end] == vocab.special[C.GEN_END] and example["loss_mask"][end]
  assert not (example["loss_mask"] & example["gen_mask"]).any()
  unconditional = sequence.build_generation_prompt(vocab, layout, "")
  assert len(unconditional["tokens"]) < n


def test_generate_options_are_checked(chat):
  with pytest.raises(ValueError, match="n must be"):
    chat.generate_images("x", 0)
  with pytest.raises(ValueError, match="top_p"):
    chat.generate_images("x", top_p=1.5)


def test_sharded_sampling_equals_single_device(chat):
  """The whole sampling loop with data/FSDP/tensor-sharded params on 8 simulated devices gives
  the single-device codes."""
  reference = chat.generate_images("a photo of a cat", 4, seed=2, temperature=0.7)
  modules = S.Modules(chat.config)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  shardings = state_layout(modules, mesh).shardings
  specs = " ".join(str(s.spec) for s in jax.tree.leaves(shardings.params))
  assert "fsdp" in specs and "tensor" in specs
  sharded = UnifiedModel(chat.config, jax.device_put(chat.params, shardings.params),
                      jax.device_put(chat.tokenizer_variables, shardings.tokenizer), chat.vocab)
  out = sharded.generate_images("a photo of a cat", 4, seed=2, temperature=0.7)
  for k in ("codes_pixel", "codes_semantic"):
    np.testing.assert_array_equal(out[k], reference[k], err_msg=k)
  np.testing.assert_allclose(out["images"], reference["images"], atol=1e-5)
