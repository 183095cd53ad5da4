"""Checkpoint bridges: reference round trip, strict key checks, HF and big_vision SigLIP layouts."""

import json

import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES
from safetensors.numpy import load_file, save_file

from dualtoken_jax import DualTokenizer
from dualtoken_jax.bridges import layout
from dualtoken_jax.bridges import siglip
from dualtoken_jax.bridges.tensor_files import CheckpointError

REF = FIXTURES / "dualtoken_ref_a"


@pytest.fixture(scope="module")
def tok():
  return DualTokenizer.from_reference(REF / "checkpoint.safetensors", REF / "config.json")


@pytest.fixture(scope="module")
def state_dict():
  return load_file(str(REF / "checkpoint.safetensors"))


def test_export_reference_round_trips_every_tensor(tok, state_dict, tmp_path):
  tok.export_reference(tmp_path / "ckpt.safetensors")
  exported = load_file(str(tmp_path / "ckpt.safetensors"))
  assert set(exported) == set(state_dict)
  for k, v in state_dict.items():
    assert exported[k].dtype == v.dtype, k
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  again = DualTokenizer.from_reference(tmp_path / "ckpt.safetensors")  # config.json beside it
  for a, b in zip(layout.flatten(layout.to_host(again.variables)).values(), layout.flatten(layout.to_host(tok.variables)).values()):
    np.testing.assert_array_equal(a, b)


def test_exported_config_reads_back(tok, tmp_path):
  tok.export_reference(tmp_path / "ckpt.safetensors")
  ref = json.loads((tmp_path / "config.json").read_text())
  original = json.loads((REF / "config.json").read_text())
  for key in ("layer_recon", "layer_sem", "layer_shortcut", "weight_shortcut", "decoder_latent_shape"):
    assert ref[key] == original[key], key
  for branch in ("vq_pix", "vq_sem"):
    for key in ("n_embed", "embed_dim", "code_shape", "bottleneck_type", "decay"):
      assert ref[branch][key] == original[branch][key], (branch, key)


def write(tmp_path, tensors, name="ckpt.safetensors"):
  path = tmp_path / name
  save_file(tensors, str(path))
  (tmp_path / "config.json").write_text((REF / "config.json").read_text())
  return path


def test_missing_extra_and_misshaped_keys_are_all_listed(state_dict, tmp_path):
  broken = dict(state_dict)
  del broken["decoder.conv_out.bias"]
  del broken["prequant_sem.attn.q_bias"]
  broken["decoder.some_new_layer.weight"] = np.zeros((3,), np.float32)
  broken["postquant_pix.proj.weight"] = np.zeros((5, 8), np.float32)
  with pytest.raises(CheckpointError) as e:
    DualTokenizer.from_reference(write(tmp_path, broken))
  message = str(e.value)
  for key in ("decoder.conv_out.bias", "prequant_sem.attn.q_bias", "decoder.some_new_layer.weight",
              "postquant_pix/proj/kernel"):
    assert key in message, message
  assert e.value.missing == ["decoder.conv_out.bias", "prequant_sem.attn.q_bias"]
  assert e.value.unexpected == ["decoder.some_new_layer.weight"]


def test_inconsistent_shared_codebook_copies_are_rejected(state_dict, tmp_path):
  broken = dict(state_dict)
  broken["quantizer_pix.codebooks.1.weight"] = broken["quantizer_pix.codebooks.1.weight"] + 1
  with pytest.raises(CheckpointError, match="shared tensors must agree"):
    DualTokenizer.from_reference(write(tmp_path, broken))


def test_nonzero_fixed_k_bias_is_rejected(state_dict, tmp_path):
  broken = dict(state_dict)
  broken["prequant_pix.attn.zero_k_bias"] = np.ones_like(broken["prequant_pix.attn.zero_k_bias"])
  with pytest.raises(CheckpointError, match="zero_k_bias"):
    DualTokenizer.from_reference(write(tmp_path, broken))


def test_ddp_module_prefix_is_accepted(tok, state_dict, tmp_path):
  prefixed = {f"module.{k}": v for k, v in state_dict.items()}
  other = DualTokenizer.from_reference(write(tmp_path, prefixed))
  np.testing.assert_array_equal(other.variables["params"]["decoder"]["conv_out"]["kernel"],
                                tok.variables["params"]["decoder"]["conv_out"]["kernel"])


def test_missing_config_and_unknown_format_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    DualTokenizer.from_reference(tmp_path / "nothing.safetensors", tmp_path / "config.json")
  (tmp_path / "config.json").write_text((REF / "config.json").read_text())
  (tmp_path / "ckpt.bin2").write_bytes(b"xx")
  with pytest.raises(ValueError, match="unsupported checkpoint format"):
    DualTokenizer.from_reference(tmp_path / "ckpt.bin2")


# ---------------------------------------------------------------- SigLIP importers
@pytest.fixture(scope="module")
def hf_siglip():
  return load_file(str(REF / "siglip" / "model.safetensors"))


def hf_vision_tower(tok, path):
  """The image tower's params (loop layout) from a HF SigLIP directory, via `siglip.load_hf`."""
  expected = {k: s for k, s in layout.loop_shapes(layout.shapes(tok.variables["params"])).items()
              if k.startswith("img/")}
  flat = siglip.load_hf(path, tok.config.vision, None, expected)
  return layout.unflatten({k[len("img/"):]: v for k, v in flat.items()})


def test_hf_vision_tower_without_prefix(tok, hf_siglip, tmp_path):
  bare = {k[len("vision_model."):]: v for k, v in hf_siglip.items() if k.startswith("vision_model.")}
  save_file(bare, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((REF / "siglip" / "config.json").read_text())
  params = hf_vision_tower(tok, tmp_path)
  reference = hf_vision_tower(tok, REF / "siglip")
  for a, b in zip(layout.flatten({"p": params}).values(), layout.flatten({"p": reference}).values()):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(params["embedding"]["kernel"],
                                bare["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))


def test_hf_extra_key_is_an_error(tok, hf_siglip, tmp_path):
  extra = dict(hf_siglip)
  extra["vision_model.encoder.layers.99.mlp.fc1.weight"] = np.zeros((2, 2), np.float32)
  save_file(extra, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((REF / "siglip" / "config.json").read_text())
  with pytest.raises(CheckpointError, match="layers.99"):
    hf_vision_tower(tok, tmp_path)


def test_from_siglip_takes_towers_and_keeps_random_rest(tmp_path):
  tiny = DualTokenizer.from_reference(REF / "checkpoint.safetensors")
  fresh = DualTokenizer.from_siglip(tiny.config, REF / "siglip", seed=1)
  teacher = hf_vision_tower(tiny, REF / "siglip")
  np.testing.assert_array_equal(fresh.variables["params"]["img"]["pos_embedding"], teacher["pos_embedding"])
  hf = load_file(str(REF / "siglip" / "model.safetensors"))
  np.testing.assert_array_equal(fresh.variables["params"]["txt"]["Embed_0"]["embedding"],
                                hf["text_model.embeddings.token_embedding.weight"])
  assert not np.allclose(fresh.variables["params"]["decoder"]["conv_out"]["kernel"],
                         tiny.variables["params"]["decoder"]["conv_out"]["kernel"])


def big_vision_npz(tok, tmp_path, *, prefix, stacked, bf16=False, grid=None):
  """Writes the tokenizer's SigLIP towers as a big_vision npz in the requested layout."""
  flat = {k[len("params/"):]: v for k, v in layout.to_loop(layout.flatten(layout.to_host(tok.variables))).items()
          if k.startswith(("params/img/", "params/txt/")) or k in ("params/t", "params/b")}
  if stacked:
    flat = layout.to_scan(flat)
  if grid is not None:  # a checkpoint trained at another resolution: a linear-ramp posemb
    ramp = np.add.outer(np.arange(grid), 2 * np.arange(grid)).astype(np.float32)
    flat["img/pos_embedding"] = np.repeat(ramp.reshape(1, grid * grid, 1), flat["img/pos_embedding"].shape[-1], -1)
  if bf16:
    flat = {k: v.astype(ml_dtypes.bfloat16).view(np.dtype("V2")) for k, v in flat.items()}
  if prefix:
    flat = {f"params/{k}": v for k, v in flat.items()}
  path = tmp_path / "siglip.npz"
  np.savez(path, **flat)
  return path


@pytest.mark.parametrize("prefix,stacked,scan_model", [(True, False, False), (False, True, False),
                                                       (True, True, True), (False, False, True)])
def test_big_vision_npz_layouts(tok, tmp_path, prefix, stacked, scan_model):
  path = big_vision_npz(tok, tmp_path, prefix=prefix, stacked=stacked)
  config = tok.config.copy_and_resolve_references()
  config.scan_layers = scan_model
  loaded = DualTokenizer.from_siglip(config, path)
  ours = layout.to_loop(layout.flatten(layout.to_host(loaded.variables)))
  theirs = layout.to_loop(layout.flatten(layout.to_host(tok.variables)))
  for k in theirs:
    if k.startswith(("params/img/", "params/txt/")):
      np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def test_big_vision_bf16_void_and_posemb_resize(tok, tmp_path):
  path = big_vision_npz(tok, tmp_path, prefix=True, stacked=False, bf16=True, grid=6)
  loaded = DualTokenizer.from_siglip(tok.config, path)
  posemb = np.asarray(loaded.variables["params"]["img"]["pos_embedding"])
  assert posemb.dtype == np.float32 and posemb.shape == (1, 81, 64)
  # Order-1 zoom maps a linear ramp on a 6x6 grid to the same ramp on the 9x9 grid.
  t = np.linspace(0, 5, 9)
  expected = np.add.outer(t, 2 * t).reshape(81)
  np.testing.assert_allclose(posemb[0, :, 0], expected, atol=1e-4)
  kernel = loaded.variables["params"]["img"]["embedding"]["kernel"]
  original = np.asarray(tok.variables["params"]["img"]["embedding"]["kernel"])
  np.testing.assert_array_equal(kernel, original.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_big_vision_subtree_loads_only_that_tower(tok, tmp_path):
  path = big_vision_npz(tok, tmp_path, prefix=True, stacked=False)
  loaded = DualTokenizer.from_siglip(tok.config, f"{path}:img", seed=3)
  params, original = loaded.variables["params"], tok.variables["params"]
  np.testing.assert_array_equal(params["img"]["embedding"]["bias"], original["img"]["embedding"]["bias"])
  assert not np.allclose(params["txt"]["Embed_0"]["embedding"], original["txt"]["Embed_0"]["embedding"])
  with pytest.raises(CheckpointError, match="no subtree"):
    DualTokenizer.from_siglip(tok.config, f"{path}:nope")


def test_big_vision_missing_block_is_an_error(tok, tmp_path):
  path = big_vision_npz(tok, tmp_path, prefix=True, stacked=False)
  arrays = dict(np.load(path))
  del arrays["params/img/Transformer/encoderblock_2/MlpBlock_0/Dense_0/bias"]
  np.savez(path, **arrays)
  with pytest.raises(CheckpointError, match="encoderblock_2/MlpBlock_0/Dense_0/bias"):
    DualTokenizer.from_siglip(tok.config, path)
