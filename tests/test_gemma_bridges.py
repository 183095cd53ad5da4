"""Checkpoint bridges: HF safetensors and official Gemma Orbax layouts, both directions, strict.

The Orbax checkpoints are written here with orbax itself, in the released key layouts built by
hand from the HF fixture (not by the bridge under test).
"""

import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, PartitionSpec

from dualtoken_jax.bridges import hf_config
from dualtoken_jax.bridges import gemma_hf
from dualtoken_jax.bridges import gemma_orbax
from dualtoken_jax.bridges import layout
from dualtoken_jax.bridges.tensor_files import CheckpointError, read_tensors, write_safetensors
from dualtoken_jax.llm import GemmaLM
from dualtoken_jax.llm import config as C

GEMMA = pathlib.Path(__file__).parent / "fixtures" / "gemma"


@pytest.fixture(scope="module")
def gemma3():
  """(GemmaLM, its loop-layout params as host arrays) from the HF Gemma 3 fixture."""
  lm = GemmaLM.from_hf(GEMMA / "gemma3")
  return lm, {k: np.asarray(v) for k, v in layout.flatten(jax.device_get(lm.params)).items()}


def _assert_same_params(params, reference):
  flat = {k: np.asarray(v) for k, v in layout.flatten(jax.device_get(params)).items()}
  if layout.is_scanned(flat):
    flat = layout.to_loop(flat)
  assert sorted(flat) == sorted(reference)
  for k in reference:
    assert flat[k].dtype == reference[k].dtype, k
    np.testing.assert_array_equal(flat[k], reference[k], err_msg=k)


@pytest.mark.parametrize("scan", [False, True])
def test_gemmalm_checks_its_params_against_the_config(gemma3, scan):
  lm, _ = gemma3
  config = C.replace(lm.config, scan_layers=scan)
  flat = {k: np.zeros(s, np.float32) for k, s in gemma_orbax.S.param_shapes(config).items()}
  GemmaLM(config, layout.unflatten(flat))  # the config's own tree
  block = "layers" if scan else "layer_1"
  del flat[f"{block}/attn/q_einsum/w"]
  flat["final_norm/scale"] = np.zeros((3,), np.float32)
  with pytest.raises(CheckpointError) as info:
    GemmaLM(config, layout.unflatten(flat))
  assert info.value.missing == [f"{block}/attn/q_einsum/w"]
  assert info.value.misshaped == [f"final_norm/scale: params (3,), config ({config.width},)"]
  other_layout = lm.params if scan else GemmaLM.init(C.replace(config, scan_layers=True)).params
  with pytest.raises(CheckpointError, match="layer_0/attn/q_einsum/w" if scan else "layers/"):
    GemmaLM(config, other_layout)


# ---------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_hf_export_round_trips_every_tensor(tmp_path, family):
  lm = GemmaLM.from_hf(GEMMA / family)
  lm.export_hf(tmp_path)
  original = read_tensors(GEMMA / family / "model.safetensors")
  exported = read_tensors(tmp_path / "model.safetensors")
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype, key
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  again = hf_config.config_from_hf(json.loads((tmp_path / "config.json").read_text()))
  assert again == lm.config


def test_hf_import_lists_every_problem(tmp_path):
  tensors = read_tensors(GEMMA / "gemma2" / "model.safetensors")
  del tensors["model.layers.1.self_attn.k_proj.weight"]
  del tensors["model.norm.weight"]
  tensors["model.layers.9.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
  tensors["model.layers.2.self_attn.o_proj.weight"] = np.zeros((64, 63), np.float32)
  config = hf_config.config_from_hf(gemma_hf.read_config(GEMMA / "gemma2"))
  with pytest.raises(CheckpointError) as info:
    gemma_hf.import_tensors(tensors, config)
  err = info.value
  assert err.missing == ["model.layers.1.self_attn.k_proj.weight", "model.norm.weight"]
  assert err.unexpected == ["model.layers.9.mlp.up_proj.weight"]
  assert len(err.misshaped) == 1 and "model.layers.2.self_attn.o_proj.weight" in err.misshaped[0]
  assert "model.norm.weight" in str(err) and "(64, 63)" in str(err)


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_hf_conditional_generation_keys(tmp_path, gemma3, prefix):
  _, reference = gemma3
  tensors = read_tensors(GEMMA / "gemma3" / "model.safetensors")
  renamed = {prefix + k[len("model."):]: v for k, v in tensors.items()}
  renamed["lm_head.weight"] = tensors["model.embed_tokens.weight"]          # tied copy: accepted
  renamed["vision_tower.vision_model.post_layernorm.weight"] = np.ones(8, np.float32)  # skipped
  renamed["multi_modal_projector.mm_input_projection_weight"] = np.ones((8, 64), np.float32)
  hf_config = {"model_type": "gemma3", "text_config": gemma_hf.read_config(GEMMA / "gemma3"),
               "eos_token_id": [1, 106]}
  write_safetensors(tmp_path / "model.safetensors", renamed)
  (tmp_path / "config.json").write_text(json.dumps(hf_config))
  lm = GemmaLM.from_hf(tmp_path)
  assert lm.config.eos_ids == (1, 106)
  _assert_same_params(lm.params, reference)
  renamed["lm_head.weight"] = renamed["lm_head.weight"] + 1
  renamed[prefix + "layers.0.extra.weight"] = np.ones(2, np.float32)
  with pytest.raises(CheckpointError, match="lm_head.weight differs") as info:
    gemma_hf.import_tensors(renamed, lm.config)
  assert info.value.unexpected == [prefix + "layers.0.extra.weight"]


@pytest.mark.parametrize("model_type,kv_heads,fused", [("gemma3_text", 1, "kv_einsum"),
                                                       ("gemma", 4, "qkv_einsum")])
def test_hf_round_trip_for_other_architectures(tmp_path, model_type, kv_heads, fused):
  """Other layouts than the fixtures: Gemma 3 multi-query (one KV head, window 3, pattern 3:1)
  and Gemma 1 multi-head (fused qkv_einsum as in official MHA checkpoints; HF's Gemma 1
  "post_attention_layernorm" is the pre-FFN norm)."""
  hf = dict(gemma_hf.read_config(GEMMA / "gemma3"), model_type=model_type,
            num_key_value_heads=kv_heads, sliding_window=3, sliding_window_pattern=4)
  config = hf_config.config_from_hf(hf)
  rng = np.random.default_rng(kv_heads)
  params = {k: rng.normal(size=s).astype(np.float32)
            for k, s in gemma_orbax.S.param_shapes(config).items()}
  assert f"layer_0/attn/{fused}/w" in params
  gemma_hf.save(tmp_path, params, config)
  state = read_tensors(tmp_path / "model.safetensors")
  assert state["model.layers.0.self_attn.k_proj.weight"].shape == (kv_heads * 16, 64)
  if model_type == "gemma":
    assert config.attention_pattern == ("global",) and not config.post_attn_norm
    np.testing.assert_array_equal(state["model.layers.0.post_attention_layernorm.weight"],
                                  params["layer_0/pre_ffw_norm/scale"])
    assert "model.layers.0.pre_feedforward_layernorm.weight" not in state
  else:
    assert config.attention_pattern == ("local",) * 3 + ("global",) and config.sliding_window == 3
  loaded, again = gemma_hf.load(tmp_path)
  assert again == config
  assert sorted(loaded) == sorted(params)
  for k in params:
    np.testing.assert_array_equal(loaded[k], params[k], err_msg=k)


def test_config_from_hf_variants_and_errors():
  base = gemma_hf.read_config(GEMMA / "gemma3")
  newer = dict(base, layer_types=["sliding_attention", "full_attention"] * 2,
               rope_scaling={"rope_type": "linear", "factor": 8.0})
  del newer["sliding_window_pattern"]
  config = hf_config.config_from_hf(newer)
  assert config.attention_pattern == ("local", "global") and config.rope_scale_global == 8.0
  assert config.rope_scale_local == 1.0
  v5 = dict(base, rope_parameters={
      "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
      "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}})
  config = hf_config.config_from_hf(v5)
  rope = (config.rope_base_global, config.rope_base_local, config.rope_scale_global)
  assert rope == (5e5, 2e4, 4.0)
  for bad, message in [(dict(base, hidden_activation="silu"), "hidden_activation"),
                       (dict(base, tie_word_embeddings=False), "tie_word_embeddings"),
                       (dict(base, model_type="mistral"), "not a supported decoder"),
                       (dict(base, rope_scaling={"rope_type": "yarn", "factor": 2.0}), "yarn"),
                       ({k: v for k, v in base.items() if k != "hidden_size"}, "hidden_size")]:
    with pytest.raises(C.ConfigError, match=message):
      hf_config.config_from_hf(bad)


# ---------------------------------------------------------------- official Orbax layouts
def _gm_flat(reference, transpose_gating=True, extra=None):
  """The released FLAT layout: `transformer/<module>` -> {leaf: array}, mlp leaves in `w`."""
  tree = {}
  for path, value in reference.items():
    if path.endswith("mlp/gating_einsum") and transpose_gating:
      value = value.transpose(0, 2, 1)  # gm's transpose_gating_einsum=True: (2, F, D)
    if path.endswith(("mlp/gating_einsum", "mlp/linear")):
      tree[f"transformer/{path}"] = {"w": value}
    else:
      module, leaf = path.rsplit("/", 1)
      tree.setdefault(f"transformer/{module}", {})[leaf] = value
  tree.update(extra or {})
  return tree


def _gm_stacked(flat, pattern_len):
  """gm STACKED: layer n goes to attention_type_{n % p}, slice n // p."""
  tree, groups = {}, {}
  for key, leaves in flat.items():
    parts = key.split("/")
    if not parts[1].startswith("layer_"):
      tree[key] = leaves
      continue
    n = int(parts[1][len("layer_"):])
    group = "/".join(["transformer/stacked_layers", f"attention_type_{n % pattern_len}",
                      *parts[2:]])
    for leaf, value in leaves.items():
      groups.setdefault((group, leaf), {})[n // pattern_len] = value
  for (group, leaf), slices in groups.items():
    tree.setdefault(group, {})[leaf] = np.stack([slices[i] for i in sorted(slices)])
  return tree


def _gm_nested(reference):
  return {"params": layout.unflatten(reference)}  # e.g. a params-only Kauldron export


def _write(path, tree):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()
  return path


@pytest.mark.parametrize("kind", ["flat", "stacked", "nested"])
def test_orbax_layouts_load_exactly(tmp_path, gemma3, kind):
  lm, reference = gemma3
  mm = {"SigLiPFromPatches_0/siglip_encoder/embedding": {"kernel": np.ones((2, 3), np.float32)},
        "transformer/embedder/mm_input_projection": {"w": np.ones((3, 64), np.float32)}}
  flat = _gm_flat(reference, extra=mm)
  # Gemma 3 1B has 26 layers in a pattern of 6; here 4 layers in a pattern of 3 leave stacks
  # of unequal lengths (layers 0, 3 | 1 | 2), as real STACKED checkpoints have.
  tree = {"flat": flat, "stacked": _gm_stacked(flat, 3), "nested": _gm_nested(reference)}[kind]
  path = _write(tmp_path / kind, tree)
  _, meta = gemma_orbax.read_metadata(path)
  assert gemma_orbax.detect_layout(meta)[0] == kind
  loaded = GemmaLM.from_orbax(path, lm.config)
  _assert_same_params(loaded.params, reference)


def test_orbax_export_is_the_released_flat_layout(tmp_path, gemma3):
  lm, reference = gemma3
  config = C.replace(lm.config, transpose_gating_einsum=True)
  GemmaLM(config, lm.params).export_orbax(tmp_path / "out")
  raw = ocp.StandardCheckpointer().restore(tmp_path / "out")
  expected = _gm_flat(reference)
  assert sorted(raw) == sorted(expected)
  for key, leaves in expected.items():
    assert sorted(raw[key]) == sorted(leaves), key
    for leaf, value in leaves.items():
      np.testing.assert_array_equal(raw[key][leaf], value, err_msg=f"{key}/{leaf}")
  _assert_same_params(GemmaLM.from_orbax(tmp_path / "out", config).params, reference)


@pytest.mark.parametrize("kind", ["stacked", "nested"])
def test_orbax_export_other_layouts_round_trip(tmp_path, gemma3, kind):
  lm, reference = gemma3
  scanned = GemmaLM.from_orbax(_write(tmp_path / "src", _gm_flat(reference)),
                               C.replace(lm.config, scan_layers=True))
  scanned.export_orbax(tmp_path / kind, layout=kind)
  _assert_same_params(GemmaLM.from_orbax(tmp_path / kind, lm.config).params, reference)


def test_orbax_mismatches_list_every_key(tmp_path, gemma3):
  lm, reference = gemma3
  tree = _gm_flat(reference)
  del tree["transformer/layer_1/attn/q_einsum"]
  del tree["transformer/final_norm"]
  tree["transformer/layer_7/attn/q_einsum"] = {"w": np.zeros((4, 64, 16), np.float32)}
  tree["transformer/layer_2/mlp/linear"] = {"w": np.zeros((95, 64), np.float32)}
  with pytest.raises(CheckpointError) as info:
    GemmaLM.from_orbax(_write(tmp_path / "bad", tree), lm.config)
  err = info.value
  assert err.missing == ["final_norm/scale", "layer_1/attn/q_einsum/w"]
  assert err.unexpected == ["layer_7/attn/q_einsum/w"]
  assert len(err.misshaped) == 1
  assert err.misshaped[0].startswith("layer_2/mlp/linear: checkpoint (95, 64)")


def test_orbax_vocab_padding_trim_extend_and_dtype(tmp_path, gemma3):
  lm, reference = gemma3
  table = reference["embedder/input_embedding"]
  padded = dict(reference, **{"embedder/input_embedding": np.concatenate(
      [table, np.full((8, table.shape[1]), 7.0, np.float32)])})
  path = _write(tmp_path / "padded", _gm_flat(padded))
  config = C.replace(lm.config, checkpoint_vocab_padding=8)
  _assert_same_params(GemmaLM.from_orbax(path, config).params, reference)  # 8 pad rows trimmed
  grown = C.replace(config, vocab_size=table.shape[0] + 3, param_dtype="bfloat16")
  params = GemmaLM.from_orbax(path, grown, seed=3).params
  new_table = np.asarray(params["embedder"]["input_embedding"])
  assert new_table.dtype == ml_dtypes.bfloat16 and new_table.shape == (table.shape[0] + 3, 64)
  np.testing.assert_array_equal(new_table[:-3], table.astype(ml_dtypes.bfloat16))
  new_rows = new_table[-3:].astype(np.float32)
  assert 0.005 < new_rows.std() < 0.05 and np.abs(new_rows - 7.0).min() > 1  # not the pad rows
  with pytest.raises(CheckpointError, match="cannot become vocab_size"):
    GemmaLM.from_orbax(path, C.replace(lm.config, vocab_size=table.shape[0] - 1))


def test_orbax_restores_straight_into_shardings(tmp_path, gemma3):
  lm, reference = gemma3
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  path = _write(tmp_path / "flat", _gm_flat(reference))
  loaded = GemmaLM.from_orbax(path, C.replace(lm.config, scan_layers=True), mesh=mesh)
  q = loaded.params["layers"]["attn"]["q_einsum"]["w"]
  assert q.sharding.mesh.shape == mesh.shape
  assert q.sharding.spec == PartitionSpec(None, "tensor", "fsdp", None)
  table = loaded.params["embedder"]["input_embedding"]
  assert table.sharding.spec == PartitionSpec("tensor", "fsdp")
  assert len(table.addressable_shards) == 8 and table.addressable_shards[0].data.shape == (64, 32)
  _assert_same_params(loaded.params, reference)


def test_save_and_from_pretrained(tmp_path, gemma3):
  lm, reference = gemma3
  lm.save(tmp_path / "mine")
  assert json.loads((tmp_path / "mine" / "config.json").read_text())["family"] == "gemma3"
  again = GemmaLM.from_pretrained(tmp_path / "mine")
  assert again.config == lm.config
  _assert_same_params(again.params, reference)
  scanned = GemmaLM.from_pretrained(tmp_path / "mine", scan_layers=True)
  assert "layers" in scanned.params
  _assert_same_params(scanned.params, reference)


def test_orbax_square_gating_follows_the_config_hint(tmp_path):
  """With F == D the stored orientation cannot be inferred: `transpose_gating_einsum` decides,
  on export and on import alike."""
  config = C.get_config("tiny", depth=1, mlp_dim=64, transpose_gating_einsum=True)
  rng = np.random.default_rng(0)
  params = layout.unflatten({k: rng.normal(size=s).astype(np.float32)
                             for k, s in gemma_orbax.S.param_shapes(config).items()})
  gemma_orbax.save(tmp_path / "ckpt", params, config)
  raw = ocp.StandardCheckpointer().restore(tmp_path / "ckpt")
  gating = params["layer_0"]["mlp"]["gating_einsum"]
  np.testing.assert_array_equal(raw["transformer/layer_0/mlp/gating_einsum"]["w"],
                                gating.transpose(0, 2, 1))
  loaded = gemma_orbax.load(tmp_path / "ckpt", config)
  np.testing.assert_array_equal(loaded["layer_0"]["mlp"]["gating_einsum"], gating)
