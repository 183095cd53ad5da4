"""Where MLLM weights come from and go to: a Gemma checkpoint (HF or official Orbax) loaded
as the `llm` subtree with the new parameters initialised, exported back exactly; a previous
stage's checkpoint; the tokenizer checkpoint; mismatches listed."""

import grain
import jax
import numpy as np
import pytest

import mllm_testdata as T
from dualtoken_jax import config_files
from dualtoken_jax.parallel import sharding
from dualtoken_jax.bridges.tensor_files import CheckpointError
from dualtoken_jax.bridges import gemma_hf
from dualtoken_jax.bridges import gemma_orbax
from dualtoken_jax.bridges import layout
from dualtoken_jax.llm import GemmaLM
from dualtoken_jax.llm import config as llm_config
from dualtoken_jax.mllm import state as S
from dualtoken_jax.models.dualtoken import abstract_variables
from dualtoken_jax.tokenizer import DualTokenizer
from dualtoken_jax.training import checkpoints
from dualtoken_jax.training.state import state_layout

CKPT_VOCAB = 120  # the checkpoint's table: the SentencePiece pieces; the MLLM config has 128


def tiny_config(**init):
  config = config_files.load("mllm_tiny")
  config.init.tokenizer = T.tokenizer_dir()
  for k, v in init.items():
    config.init[k] = v
  return config


def create(config, mesh_shape=(1, 1, 1)):
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)),
                            jax.devices()[:int(np.prod(mesh_shape))])
  modules = S.Modules(config)
  shardings = state_layout(modules, mesh).shardings
  return modules.create(mesh, shardings), shardings


@pytest.fixture(scope="module")
def gemma():
  """A Gemma checkpoint of the tiny MLLM's decoder shape with the pieces-only vocabulary."""
  llm = llm_config.replace(tiny_config().model.llm, vocab_size=CKPT_VOCAB)
  lm = GemmaLM.init(llm, seed=5)
  return lm, {k: np.asarray(v) for k, v in layout.flatten(jax.device_get(lm.params)).items()}


def _check_llm_subtree(state, reference):
  flat = {k: np.asarray(v) for k, v in layout.flatten(jax.device_get(state.params["llm"])).items()}
  assert sorted(flat) == sorted(reference)
  for k, v in reference.items():
    if k == gemma_orbax.EMBEDDING:
      np.testing.assert_array_equal(flat[k][:CKPT_VOCAB], v)
      new_rows = flat[k][CKPT_VOCAB:]
      assert new_rows.shape == (8, 64) and 0.01 < new_rows.std() < 0.03  # N(0, 0.02)
    else:
      np.testing.assert_array_equal(flat[k], v, err_msg=k)
  projector = layout.flatten(jax.device_get(state.params["projector"]))
  assert projector["fc1/kernel"].shape == (16, 64) and np.abs(projector["fc1/kernel"]).sum() > 0


@pytest.mark.parametrize("kind", ["hf", "orbax"])
def test_gemma_checkpoint_becomes_the_llm_subtree_and_exports_back(tmp_path, gemma, kind):
  lm, reference = gemma
  if kind == "hf":
    lm.export_hf(tmp_path / "in")
    config = tiny_config(llm_hf=str(tmp_path / "in"))
  else:
    lm.export_orbax(tmp_path / "in")
    config = tiny_config(llm_orbax=str(tmp_path / "in"))
  state, shardings = create(config, (1, 4, 2))  # restored straight into a sharded layout
  _check_llm_subtree(state, reference)
  leaf = state.params["llm"]["layer_0"]["mlp"]["gating_einsum"]
  assert leaf.sharding == shardings.params["llm"]["layer_0"]["mlp"]["gating_einsum"]
  assert not leaf.sharding.is_fully_replicated
  # Export: the llm subtree is a Gemma checkpoint again, every tensor exact.
  out = GemmaLM(config.model.llm, state.params["llm"])
  expected = layout.flatten(jax.device_get(state.params["llm"]))
  if kind == "hf":
    out.export_hf(tmp_path / "out")
    back, _ = gemma_hf.load(tmp_path / "out")
  else:
    out.export_orbax(tmp_path / "out")
    back = layout.flatten(jax.device_get(gemma_orbax.load(tmp_path / "out", config.model.llm)))
  assert sorted(back) == sorted(expected)
  for k in expected:
    np.testing.assert_array_equal(np.asarray(back[k]), expected[k], err_msg=k)


def test_mismatched_llm_checkpoint_lists_the_differences(tmp_path):
  other = llm_config.replace(tiny_config().model.llm, vocab_size=CKPT_VOCAB, mlp_dim=96,
                             num_kv_heads=1)
  GemmaLM.init(other).export_hf(tmp_path)
  with pytest.raises(CheckpointError) as e:
    create(tiny_config(llm_hf=str(tmp_path)))
  assert "mlp_dim: checkpoint 96, config 128" in str(e.value)
  assert "num_kv_heads: checkpoint 1, config 2" in str(e.value)


def test_tokenizer_checkpoint_must_match_and_may_carry_unused_towers(tmp_path):
  base = DualTokenizer.from_pretrained(T.tokenizer_dir())
  flat = layout.flatten(jax.device_get(base.variables))
  # A tokenizer saved with its text tower (zeros here: only the layout matters).
  with_text = base.config.copy_and_resolve_references()
  with_text.text = config_files.load("dualtoken_tiny").model.text
  with_text.text.width = 64
  full = {k: flat.get(k, np.zeros(v.shape, v.dtype))
          for k, v in layout.flatten(abstract_variables(with_text)).items()}
  DualTokenizer(with_text, layout.unflatten(full)).save(tmp_path / "with_text")
  state, _ = create(tiny_config(tokenizer=str(tmp_path / "with_text")))
  assert "txt" not in state.tokenizer["params"]  # the text tower is not loaded
  for x, y in zip(jax.tree.leaves(state.tokenizer), jax.tree.leaves(base.variables)):
    np.testing.assert_array_equal(x, y)
  # One with another pixel codebook size does not fit the config.
  wrong = base.config.copy_and_resolve_references()
  wrong.vq_pix.codebook_size = 128
  small = {k: (v[:128] if k.startswith("vq_stats/quantizer_pix/") else v) for k, v in flat.items()}
  DualTokenizer(wrong, layout.unflatten(small)).save(tmp_path / "wrong")
  with pytest.raises(CheckpointError, match=r"quantizer_pix/codebook: checkpoint \(128, 8\), "
                                            r"config \(256, 8\)"):
    create(tiny_config(tokenizer=str(tmp_path / "wrong")))


def test_next_stage_starts_from_the_previous_stages_params(tmp_path):
  config = tiny_config()
  state, _ = create(config)
  state = state.replace(params=jax.tree.map(lambda x: x + 1, state.params))
  ckpt = checkpoints.Checkpointer(tmp_path / "align" / "checkpoints", every_steps=1, keep=1,
                                  async_save=False)
  ckpt.save(7, state, iter(grain.MapDataset.range(3).to_iter_dataset()),
            {"step": 7, "config": config.to_dict()}, force=True)  # as train_mllm writes it
  ckpt.close()
  sft = config_files.load("mllm_tiny:stage=sft")
  sft.init.mllm = str(tmp_path / "align")
  resumed, _ = create(sft)
  for x, y in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(resumed.tokenizer), jax.tree.leaves(state.tokenizer)):
    np.testing.assert_array_equal(x, y)
  assert int(resumed.step) == 0  # a new stage: fresh step count and optimiser
  with pytest.raises(FileNotFoundError, match="no training checkpoint"):
    checkpoints.latest_step_dir(tmp_path / "nothing")


@pytest.mark.parametrize("spec, stage, lr, batch, trains", [
    ("mllm_alignment", "alignment", 1e-3, 64, {"projector"}),
    ("mllm_sft", "sft", 2e-5, 256, {"projector", "llm"}),
    ("mllm_generation", "generation", 1e-4, 128, {"gen_pixel", "gen_semantic"}),
    ("mllm_joint:part=2", "joint", 1e-5, 256, {"projector", "llm", "gen_pixel", "gen_semantic"}),
])
def test_paper_stage_configs_freeze_the_right_parts(spec, stage, lr, batch, trains):
  """The four stages of the paper's hyper-parameter table, on a Gemma-2B-shaped decoder with
  the SigLIP-L/16 tokenizer (shapes only): which top-level parts train, lr and batch size."""
  config = config_files.load(f"{spec}:llm=gemma_2b" if ":" not in spec else f"{spec},llm=gemma_2b")
  assert (config.stage, config.optimizer.lr, config.batch_size) == (stage, lr, batch)
  modules = S.Modules(config)
  abstract, _ = modules.abstract_state()
  masks = modules.masks(abstract.params)
  trained = {part for part, tree in masks.items() if any(np.any(m) for m in jax.tree.leaves(tree))}
  frozen = {part for part, tree in masks.items() if not all(np.all(m) for m in jax.tree.leaves(tree))}
  assert trained == trains and frozen == set(masks) - trains
  assert set(abstract.params) == {"llm", "projector", "gen_pixel", "gen_semantic"}
