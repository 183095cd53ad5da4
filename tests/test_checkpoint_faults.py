"""Wrong, corrupted and truncated checkpoints fail at load with an error naming the file
(issue 16, items 7, 8 and 10): checkpoint kinds, non-finite weights, checksum manifests."""

import json
import shutil
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dualtoken_jax import DualTokenizer, chat, config_files, generate
from dualtoken_jax.bridges import gemma_hf, gemma_orbax, layout
from dualtoken_jax.bridges.tensor_files import (CHECKSUMS, CheckpointError, read_tensors,
                                                write_safetensors)
from dualtoken_jax.llm import GemmaLM
from dualtoken_jax.training import checkpoints

GEMMA3 = Path(__file__).parent / "fixtures" / "gemma" / "gemma3"


@pytest.fixture(scope="module")
def tok():
  return DualTokenizer.from_config(config_files.load("dualtoken_tiny").model, seed=0)


def fake_run(workdir: Path, model: dict, step: int = 3) -> Path:
  """A training workdir whose newest step holds `meta` with `model` (and an empty state/)."""
  step_dir = workdir / "checkpoints" / str(step)
  (step_dir / "state").mkdir(parents=True)
  ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(step_dir / "meta", {"step": step, "config": {
      "model": model}})
  return workdir


# ---------------------------------------------------------------- item 7: checkpoint kinds
def test_chat_on_a_tokenizer_training_run_says_what_it_is(tmp_path, capsys):
  fake_run(tmp_path, {"vq_pix": {}, "vision": {}})
  assert chat.main(["--checkpoint", str(tmp_path), "--prompt", "hi"]) == 1
  err = capsys.readouterr().err
  assert "is a tokenizer training run" in err and "an MLLM training run" in err and "step 3" in err


def test_generate_on_a_saved_tokenizer_says_what_it_is(tmp_path, capsys):
  (tmp_path / "state").mkdir()
  (tmp_path / "config.json").write_text("{}")
  assert generate.main(["--checkpoint", str(tmp_path), "--prompt", "a cat",
                        "--out", str(tmp_path / "x.png")]) == 1
  err = capsys.readouterr().err
  assert "saved DualTokenizer" in err and "no meta/" in err and "not found" not in err


def test_tokenizer_load_of_an_mllm_run_says_what_it_is(tmp_path):
  fake_run(tmp_path, {"llm": {}, "tokenizer": {}})
  with pytest.raises(checkpoints.CheckpointKindError,
                     match="is an MLLM training run .* tokenizer training run .* was expected"):
    DualTokenizer.load(tmp_path)


# ---------------------------------------------------------------- item 8: corrupted weights
def test_flipped_bytes_in_a_saved_tokenizer_name_the_file(tok, tmp_path):
  tok.save(tmp_path / "tok")
  manifest = json.loads((tmp_path / "tok" / CHECKSUMS).read_text())["sha256"]
  assert manifest and all(name.startswith("state/") for name in manifest)
  DualTokenizer.from_pretrained(tmp_path / "tok")  # intact: loads
  biggest = max((tmp_path / "tok" / "state").rglob("*"), key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0xFF
  biggest.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match=f"{biggest.name}: sha256 differs"):
    DualTokenizer.from_pretrained(tmp_path / "tok")


def test_nan_weights_in_a_saved_tokenizer_are_named(tok, tmp_path):
  variables = jax.tree.map(np.array, tok.variables)  # writable host copies
  variables["params"]["decoder"]["conv_in"]["kernel"][0, 0, 0, 0] = np.nan
  DualTokenizer(tok.config, variables).save(tmp_path / "nan")
  with pytest.raises(CheckpointError, match="non-finite weights(.|\n)*decoder/conv_in/kernel"):
    DualTokenizer.from_pretrained(tmp_path / "nan")


def test_nan_tensor_in_a_reference_safetensors_is_named(tok, tmp_path):
  path = tmp_path / "ref" / "model.safetensors"
  tok.export_reference(path)
  tensors = read_tensors(path)
  name = sorted(k for k in tensors if tensors[k].dtype == np.float32)[0]
  tensors[name].flat[0] = np.inf
  write_safetensors(path, tensors)
  with pytest.raises(CheckpointError, match=f"{path}(.|\n)*NaN/Inf"):
    DualTokenizer.from_reference(path)


def test_nan_tensor_in_an_hf_llm_checkpoint_is_named(tmp_path):
  shutil.copytree(GEMMA3, tmp_path / "hf")
  tensors = read_tensors(tmp_path / "hf" / "model.safetensors")
  name = next(k for k in sorted(tensors) if k.endswith("q_proj.weight"))
  tensors[name] = tensors[name].copy()
  tensors[name].flat[3] = np.nan
  write_safetensors(tmp_path / "hf" / "model.safetensors", tensors)
  with pytest.raises(CheckpointError, match="HF checkpoint .*hf holds non-finite weights"):
    gemma_hf.load(tmp_path / "hf")


def test_nan_leaf_in_an_orbax_llm_checkpoint_is_named(tmp_path):
  lm = GemmaLM.from_hf(GEMMA3)
  flat = {k: np.asarray(v) for k, v in layout.flatten(jax.device_get(lm.params)).items()}
  flat["layer_0/attn/q_einsum/w"] = flat["layer_0/attn/q_einsum/w"].copy()
  flat["layer_0/attn/q_einsum/w"].flat[0] = np.nan
  gemma_orbax.save(tmp_path / "ckpt", flat, lm.config)
  with pytest.raises(CheckpointError, match="non-finite weights(.|\n)*layer_0/attn/q_einsum/w"):
    GemmaLM.from_orbax(tmp_path / "ckpt", lm.config)


def test_training_checkpoint_checksums_are_optional_and_verified(tmp_path):
  state = {"w": np.arange(64, dtype=np.float32).reshape(8, 8)}
  data_iter = iter(grain.MapDataset.range(8).to_iter_dataset())
  for checksums in (False, True):
    ckpt = checkpoints.Checkpointer(tmp_path / str(checksums), every_steps=1, keep=2,
                                    async_save=False, checksums=checksums)
    ckpt.save(1, state, data_iter, {"step": 1}, force=True)
    ckpt.wait()
    assert (tmp_path / str(checksums) / "1" / CHECKSUMS).is_file() == checksums
    restored, _ = ckpt.restore(1, jax.tree.map(ocp.utils.to_shape_dtype_struct, state), data_iter)
    np.testing.assert_array_equal(restored["w"], state["w"])
  files = [p for p in (tmp_path / "True" / "1" / "state").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:-1] + bytes([biggest.read_bytes()[-1] ^ 1]))
  with pytest.raises(CheckpointError, match=f"{biggest.name}: sha256 differs"):
    ckpt.restore(1, jax.tree.map(ocp.utils.to_shape_dtype_struct, state), data_iter)
  ckpt.close()


# ---------------------------------------------------------------- item 10: truncated files
@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_truncated_tensor_file_names_the_file(tmp_path, suffix):
  path = tmp_path / f"weights{suffix}"
  arrays = {"a": np.ones((64, 64), np.float32)}
  if suffix == ".safetensors":
    write_safetensors(path, arrays)
  else:
    np.savez(path, **arrays)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(CheckpointError, match=f"{path} is not a readable {suffix} file"):
    read_tensors(path)
