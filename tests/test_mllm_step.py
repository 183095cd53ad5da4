"""The MLLM training step (understanding and generation rows mixed): equal on every mesh, the
alignment and generation stages leave their frozen parts bitwise unchanged, per-layer freezing
of a scanned decoder, non-finite steps change nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mllm_testdata as T
from dualtoken_jax import config_files, data
from dualtoken_jax.parallel import sharding
from dualtoken_jax.data import load_image
from dualtoken_jax.bridges import layout
from dualtoken_jax.mllm import sequence
from dualtoken_jax.mllm import state as S
from dualtoken_jax.mllm.step import make_train_step
from dualtoken_jax.training import optimizer as O
from dualtoken_jax.training.state import state_layout

BATCH = 8


def tiny_config(stage="sft", llm="tiny"):
  config = config_files.load(f"mllm_tiny:stage={stage},llm={llm}")
  config.init.tokenizer = T.tokenizer_dir()
  config.data.captions = "(in-memory test batch)"  # the step computes the heads' code loss
  # Adam's first update is ~lr·sign(g): where a gradient entry is ~0, reduction order can flip
  # its sign across meshes. A small first-step lr keeps such flips below the 1e-5 tolerance.
  config.optimizer.lr = 1e-5
  return config


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
  """Eight rows about the bundled photos, images encoded in-step: conversations (one
text-only) and, in rows 1, 3 and 5, caption -> image generation examples."""
  config = tiny_config()
  spm = T.train_spm(tmp_path_factory.mktemp("spm") / "t.model", T.corpus())
  vocab = sequence.Vocabulary.load(spm, config.model.special_tokens)
  lay = sequence.Layout.from_config(config)
  rows = []
  for i, (key, path) in enumerate(list(T.photos().items())[:BATCH]):
    text_only = i == BATCH - 1
    if i in (1, 3, 5):
      ex = sequence.build_generation_example(vocab, lay, "a photo of " + T.ANSWERS[key])
    else:
      ex = sequence.build_example(vocab, lay, T.conversation(
          None if text_only else path, T.TRAIN_QUESTIONS[i % 4], T.ANSWERS[key],
          marker=not text_only)["conversations"], has_image=not text_only)
    ex["has_image"] = np.bool_(not text_only)
    ex["image"] = np.zeros((32, 32, 3), np.float32) if text_only else load_image(path, 32)
    rows.append(ex)
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


_INITIAL, _COMPILED = {}, {}


def initial_state(config):
  """The fresh state of `config`, created once on one device and reused by every mesh."""
  key = config.to_json()
  if key not in _INITIAL:
    modules = S.Modules(config)
    mesh = sharding.single_device_mesh()
    _INITIAL[key] = jax.device_get(modules.create(mesh, state_layout(modules, mesh).shardings))
  return _INITIAL[key]


def run_steps(config, batch, mesh_shape, steps=1, state=None):
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), devices)
  modules = S.Modules(config)
  shardings = state_layout(modules, mesh).shardings
  batch_sharding = data.batch_sharding(mesh)
  key = (config.to_json(), mesh_shape)
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(make_train_step(modules, mesh),
                             in_shardings=(shardings, batch_sharding),
                             out_shardings=(shardings, None))
  first = jax.device_put(state if state is not None else initial_state(config), shardings)
  new = first
  for _ in range(steps):
    new, metrics = _COMPILED[key](new, jax.device_put(batch, batch_sharding))
  return first, new, jax.device_get(metrics), shardings


@pytest.fixture(scope="module")
def single(batch):
  return run_steps(tiny_config(), batch, (1, 1, 1))


@pytest.mark.parametrize("llm, mesh_shape", [("tiny", (1, 8, 1)), ("tiny", (2, 2, 2)),
                                             ("tiny_qwen2", (2, 2, 2))])
def test_sharded_step_equals_single_device(single, batch, llm, mesh_shape):
  # tiny_qwen2: a Qwen-style decoder (q/k/v biases, RMSNorm w, SwiGLU, no embedding scaling).
  _, ref, ref_metrics, _ = single if llm == "tiny" else run_steps(tiny_config(llm=llm), batch,
                                                                  (1, 1, 1))
  _, new, metrics, shardings = run_steps(tiny_config(llm=llm), batch, mesh_shape)
  specs = " ".join(str(s.spec) for s in jax.tree.leaves(shardings.params))
  assert "fsdp" in specs and (mesh_shape[2] == 1 or "tensor" in specs)  # really sharded
  assert metrics["finite"] == 1.0 and ref_metrics["answer_tokens"] > 0
  for k in ("loss", "text_loss", "image_loss", "pixel_code_loss", "semantic_code_accuracy",
            "accuracy", "grad_norm", "answer_tokens"):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for name in ("params", "opt_state"):
    for x, y in zip(jax.tree.leaves(getattr(new, name)), jax.tree.leaves(getattr(ref, name))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5, err_msg=name)


def test_step_trains_projector_and_llm_in_sft_and_keeps_the_tokenizer(single):
  first, new, metrics, _ = single
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 1.0  # untrained: near log(vocab)
  # Untrained heads: the code loss is near log(K) = log(256).
  assert abs(metrics["image_loss"] - np.log(256)) < 1.0
  np.testing.assert_allclose(metrics["loss"], metrics["text_loss"] + metrics["image_loss"],
                             rtol=1e-6)
  changed = _changed(first.params, new.params)
  assert any(k.startswith("projector/") for k in changed) and any(
      k.startswith("llm/layer_1/") for k in changed)
  assert not any(k.startswith("gen_") for k in changed)  # sft does not train the heads
  for x, y in zip(jax.tree.leaves(first.tokenizer), jax.tree.leaves(new.tokenizer)):
    np.testing.assert_array_equal(x, y)
  assert int(new.step) == 1


@pytest.mark.parametrize("llm", ["tiny", "tiny_qwen2"])
def test_alignment_stage_trains_the_projector_only(batch, llm):
  config = tiny_config("alignment", llm)
  config.optimizer.lr = 1e-3
  first, new, metrics, _ = run_steps(config, batch, (1, 1, 1), steps=2)
  assert metrics["finite"] == 1.0
  changed = _changed(first.params, new.params)
  assert changed and all(k.startswith("projector/") for k in changed), changed
  frozen = [k for k in layout.flatten(first.params) if k.startswith("llm/")]
  assert len(frozen) >= 20 and not set(frozen) & changed  # bitwise unchanged
  modules = S.Modules(config)
  trainable, total = O.count_trainable(first.params, modules.masks(first.params))
  projector = sum(np.size(v) for k, v in layout.flatten(first.params).items()
                  if k.startswith("projector/"))
  assert trainable == projector < total
  # No Adam moments are kept for the frozen LLM.
  moments = sum(np.size(x) for x in jax.tree.leaves(new.opt_state))
  assert moments < 3 * projector


@pytest.mark.parametrize("llm", ["tiny", "tiny_qwen2"])
def test_generation_stage_trains_the_heads_only(batch, llm):
  config = tiny_config("generation", llm)
  config.optimizer.lr = 1e-3
  first, new, metrics, _ = run_steps(config, batch, (1, 1, 1), steps=2)
  assert metrics["finite"] == 1.0
  changed = _changed(first.params, new.params)
  heads = {k for k in layout.flatten(first.params) if k.startswith(("gen_pixel/", "gen_semantic/"))}
  # Every head parameter gets a gradient (its projector and classifiers included); the LLM
  # and the understanding projector stay bitwise unchanged.
  assert changed == heads, sorted(changed ^ heads)[:5]
  assert any("/proj/fc1/" in k for k in heads) and any("classifiers" in k for k in heads)


def test_code_loss_only_scores_generation_rows(batch):
  """Removing the generation rows' gen_mask removes the code loss; the text loss of the
  image positions stays out either way."""
  config = tiny_config()
  no_gen = dict(batch, gen_mask=np.zeros_like(batch["gen_mask"]))
  _, _, metrics, _ = run_steps(config, no_gen, (1, 1, 1))
  assert metrics["image_loss"] == 0.0
  assert not (batch["loss_mask"] & batch["image_mask"]).any()


def test_non_finite_step_changes_nothing(batch):
  config = tiny_config()
  state = initial_state(config)
  bad = jax.tree.map(np.copy, state)
  bad.params["projector"]["fc1"]["kernel"][0, 0] = np.nan
  first, new, metrics, _ = run_steps(config, batch, (1, 1, 1), state=bad)
  assert metrics["finite"] == 0.0
  for name in ("params", "opt_state"):
    for x, y in zip(jax.tree.leaves(getattr(new, name)), jax.tree.leaves(getattr(first, name))):
      np.testing.assert_array_equal(x, y)
  assert int(new.step) == 1


def test_per_layer_freezing_of_a_scanned_decoder():
  """Regexes name layers (`llm/layer_0/...`) whether or not the decoder is scanned."""
  config = tiny_config()
  config.model.llm.scan_layers = True
  config.frozen = [r"llm/layer_0/.*", r"llm/embedder/.*"]
  modules = S.Modules(config)
  abstract, _ = modules.abstract_state()
  params = jax.tree.map(lambda a: np.full(a.shape, 0.5, a.dtype), abstract.params)
  masks = modules.masks(params)
  q = masks["llm"]["layers"]["attn"]["q_einsum"]["w"]
  np.testing.assert_array_equal(q, [False, True])
  # Stacked norm scales (L, D) are per-layer vectors: no weight decay on them.
  assert not O.decay_mask(params)["llm"]["layers"]["pre_attention_norm"]["scale"]
  assert O.decay_mask(params)["llm"]["layers"]["mlp"]["linear"]
  tx = O.with_freezing(optax.adamw(1e-2, weight_decay=0.1), masks)
  grads = jax.tree.map(jnp.ones_like, params)
  new = jax.jit(lambda p, g: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(params, grads)
  w = lambda p: p["llm"]["layers"]["attn"]["q_einsum"]["w"]
  np.testing.assert_array_equal(w(new)[0], w(params)[0])
  assert not np.allclose(w(new)[1], w(params)[1])
  np.testing.assert_array_equal(new["llm"]["embedder"]["input_embedding"],
                                params["llm"]["embedder"]["input_embedding"])


def _changed(before, after) -> set[str]:
  a, b = layout.flatten(before), layout.flatten(after)
  return {k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k]))}
