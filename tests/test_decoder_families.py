"""Qwen2 and Llama decoders against HF transformers golden outputs (tests/fixtures/qwen_llama),
through `DecoderLM.from_hf`: logits, hidden states, cached greedy decoding, export -> import,
sharded checkpoints, strictness and the HF config fields of each family."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from dualtoken_jax.bridges import hf_config
from dualtoken_jax.bridges import gemma_hf
from dualtoken_jax.bridges import layout
from dualtoken_jax.bridges.tensor_files import CheckpointError, read_tensors, write_npz
from dualtoken_jax.llm import DecoderLM, GemmaLM
from dualtoken_jax.llm import attention
from dualtoken_jax.llm import config as C

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "qwen_llama"
FAMILIES = ("qwen2", "llama")
LAYOUTS = (False, True)  # scan_layers
ATOL = 1e-4


@pytest.fixture(scope="module")
def models():
  """(family, scan_layers) -> (DecoderLM through from_hf, golden arrays)."""
  return {(f, scan): (DecoderLM.from_hf(FIXTURES / f, scan_layers=scan),
                      dict(np.load(FIXTURES / f / "golden.npz")))
          for f in FAMILIES for scan in LAYOUTS}


def _hf_hidden(out):
  """Our residual stream in HF's `hidden_states` convention (the last entry after the norm)."""
  return np.concatenate([np.asarray(out["hidden"][:-1]), np.asarray(out["pre_logits"])[None]])


@pytest.mark.parametrize("scan", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_hidden_and_greedy_match_hf(models, family, scan):
  lm, golden = models[family, scan]
  assert lm.config.family == family and lm.config.scan_layers == scan
  logits, out = lm.forward(golden["tokens"], return_hidden=True)
  np.testing.assert_allclose(logits, golden["logits"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(_hf_hidden(out), golden["hidden_states"], atol=ATOL, rtol=0)
  new = golden["greedy"].shape[1] - golden["prompt"].shape[1]
  np.testing.assert_array_equal(lm.generate(golden["prompt"], new, eos_ids=()), golden["greedy"])


def test_config_from_hf_reads_each_family(models):
  qwen, llama = models["qwen2", False][0].config, models["llama", False][0].config
  assert (qwen.qkv_bias, qwen.tie_embeddings, qwen.rope_base_global) == (True, True, 1e6)
  assert (llama.qkv_bias, llama.tie_embeddings, llama.rope_base_global) == (False, False, 1e4)
  for c in (qwen, llama):
    assert (c.norm_offset, c.scale_embeddings, c.activation) == (0.0, False, "silu")
    assert c.attention_pattern == ("global",) and c.sliding_window is None
    assert (c.num_kv_heads, c.head_dim, c.bos_id, c.eos_ids) == (2, 16, 1, (2,))
  qwen_params = models["qwen2", False][0].params
  assert qwen_params["layer_0"]["attn"]["q_einsum"]["b"].shape == (4, 16)
  assert qwen_params["layer_0"]["attn"]["kv_einsum"]["b"].shape == (2, 2, 16)
  assert "output_embedding" not in qwen_params["embedder"]
  assert models["llama", True][0].params["embedder"]["output_embedding"].shape == (128, 64)


@pytest.mark.parametrize("scan", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_export_import_round_trip_is_bit_exact(models, tmp_path, family, scan):
  lm, _ = models[family, scan]
  lm.export_hf(tmp_path)
  original = read_tensors(FIXTURES / family / "model.safetensors")
  exported = read_tensors(tmp_path / "model.safetensors")
  assert sorted(exported) == sorted(original)  # tied: no lm_head.weight written
  for k, v in original.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  again = DecoderLM.from_hf(tmp_path, scan_layers=scan)
  assert again.config == lm.config
  flat, back = layout.flatten(lm.params), layout.flatten(again.params)
  assert sorted(back) == sorted(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_loads_the_same(models, tmp_path, family):
  lm, golden = models[family, False]
  gemma_hf.save(tmp_path, layout.flatten(lm.params), lm.config, max_shard_bytes=40_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not (tmp_path / "model.safetensors").exists()
  sharded = DecoderLM.from_hf(tmp_path)
  np.testing.assert_array_equal(sharded.logits(golden["tokens"]), lm.logits(golden["tokens"]))


def test_strict_lm_head_rules(tmp_path):
  tied = read_tensors(FIXTURES / "qwen2" / "model.safetensors")
  qwen = hf_config.config_from_hf(gemma_hf.read_config(FIXTURES / "qwen2"))
  assert "lm_head.weight" not in tied
  gemma_hf.import_tensors(dict(tied, **{"lm_head.weight": tied["model.embed_tokens.weight"]}), qwen)
  with pytest.raises(CheckpointError, match="differs from model.embed_tokens.weight"):
    gemma_hf.import_tensors(dict(tied, **{"lm_head.weight": -tied["model.embed_tokens.weight"]}),
                            qwen)
  untied = read_tensors(FIXTURES / "llama" / "model.safetensors")
  llama = hf_config.config_from_hf(gemma_hf.read_config(FIXTURES / "llama"))
  with pytest.raises(CheckpointError, match=r"missing keys:\n    lm_head.weight"):
    gemma_hf.import_tensors({k: v for k, v in untied.items() if k != "lm_head.weight"}, llama)
  biasless = {k: v for k, v in tied.items() if not k.endswith("q_proj.bias")}
  with pytest.raises(CheckpointError, match="3 missing keys"):
    gemma_hf.import_tensors(biasless, qwen)


def test_unsupported_model_type_names_the_supported_ones():
  hf = dict(gemma_hf.read_config(FIXTURES / "llama"), model_type="mistral",
            architectures=["MistralForCausalLM"])
  with pytest.raises(C.ConfigError, match=r"'mistral'.*supported model_types: .*'llama'.*'qwen2'"):
    hf_config.config_from_hf(hf)
  no_type = {k: v for k, v in gemma_hf.read_config(FIXTURES / "qwen2").items() if k != "model_type"}
  assert hf_config.config_from_hf(no_type).family == "qwen2"  # from `architectures`


def test_hf_sliding_window_and_rope_scaling_fields():
  base = gemma_hf.read_config(FIXTURES / "qwen2")
  windowed = hf_config.config_from_hf(dict(base, use_sliding_window=True, sliding_window=6,
                                   max_window_layers=1))
  assert C.layer_types(windowed) == ("global", "local", "local") and windowed.sliding_window == 6
  assert hf_config.config_from_hf(hf_config.config_to_hf(windowed)) == windowed
  llama = gemma_hf.read_config(FIXTURES / "llama")
  scaled = hf_config.config_from_hf(dict(llama, rope_scaling=dict(
      rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
      original_max_position_embeddings=32)))
  assert scaled.rope_llama3 == (8.0, 1.0, 4.0, 32.0)
  assert hf_config.config_from_hf(hf_config.config_to_hf(scaled)) == scaled
  linear = hf_config.config_from_hf(dict(llama, rope_scaling={"type": "linear", "factor": 2.0}))
  assert linear.rope_scale_global == linear.rope_scale_local == 2.0
  with pytest.raises(C.ConfigError, match="'yarn' is not supported"):
    hf_config.config_from_hf(dict(llama, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
  # Llama 3 scaling: long wavelengths divided by the factor, short ones kept, a ramp between.
  plain = np.asarray(attention.rope_inv_freq(16, 1e4))
  freq = np.asarray(attention.rope_inv_freq(16, 1e4, scaled.rope_llama3))
  wavelen = 2 * np.pi / plain
  np.testing.assert_allclose(freq[wavelen < 32 / 4], plain[wavelen < 32 / 4])
  np.testing.assert_allclose(freq[wavelen > 32], plain[wavelen > 32] / 8, rtol=1e-6)


def test_variants_and_the_gemma_name():
  assert GemmaLM is DecoderLM
  q3, q7, l2 = C.get_config("qwen2.5_3b"), C.get_config("qwen2.5_7b"), C.get_config("llama2_7b")
  assert (q3.width, q3.depth, q3.num_heads, q3.num_kv_heads, q3.head_dim, q3.mlp_dim,
          q3.vocab_size, q3.rope_base_global, q3.tie_embeddings) == (
              2048, 36, 16, 2, 128, 11008, 151936, 1e6, True)
  assert (q7.width, q7.depth, q7.num_kv_heads, q7.mlp_dim, q7.vocab_size, q7.tie_embeddings) == (
      3584, 28, 4, 18944, 152064, False)
  assert (l2.width, l2.num_kv_heads, l2.vocab_size, l2.norm_eps, l2.tie_embeddings,
          l2.rope_base_global) == (4096, 32, 32000, 1e-5, False, 1e4)
  assert hf_config.config_from_hf(hf_config.config_to_hf(q7)) == C.replace(q7, param_dtype="float32")
  tiny = DecoderLM.init(C.get_config("tiny_llama", dtype="bfloat16"), seed=1)
  assert tiny.logits(jnp.ones((1, 4), jnp.int32)).shape == (1, 4, 128)


def test_save_and_from_pretrained_keep_the_family(tmp_path):
  config = C.get_config("tiny_llama", rope_llama3=(8.0, 1.0, 4.0, 32.0))
  lm = DecoderLM.init(config, seed=2)
  lm.save(tmp_path / "mine")
  again = DecoderLM.from_pretrained(tmp_path / "mine", scan_layers=True)
  assert again.config == C.replace(config, scan_layers=True)
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
  np.testing.assert_allclose(again.logits(tokens), lm.logits(tokens), atol=1e-5, rtol=0)


def test_big_vision_npz_llm_loads_strictly(tmp_path):
  config = C.get_config("tiny", depth=2)
  lm = DecoderLM.init(C.replace(config, scan_layers=True), seed=3)
  arrays = {f"params/llm/{k}": np.asarray(v) for k, v in layout.flatten(lm.params).items()}
  arrays["params/img/embedding/kernel"] = np.zeros((2, 2), np.float32)  # skipped knowingly
  write_npz(tmp_path / "pali.npz", arrays)
  for scan in LAYOUTS:
    loaded = DecoderLM.from_big_vision(tmp_path / "pali.npz", C.replace(config, scan_layers=scan))
    np.testing.assert_array_equal(loaded.logits(np.ones((1, 5), np.int32)),
                                  lm.logits(np.ones((1, 5), np.int32)))
  del arrays["params/llm/layers/mlp/linear"]
  arrays["params/llm/layers/extra"] = np.zeros((2,), np.float32)
  write_npz(tmp_path / "bad.npz", arrays)
  with pytest.raises(CheckpointError, match=r"(?s)missing keys:\n    layers/mlp/linear.*"
                                            r"unexpected keys:\n    layers/extra"):
    DecoderLM.from_big_vision(tmp_path / "bad.npz", config)


@pytest.mark.parametrize("scan, bound", [(False, 0.35), (True, 0.8)])
def test_hf_params_stream_into_place_parameter_by_parameter(tmp_path, scan, bound):
  """`load_params` (what `from_hf` and the MLLM's `init.llm_hf` use) holds one (stacked)
  parameter on the host at a time: its peak beyond the placed params stays far below the
  model's size, which the eager `load` (one full converted copy) reaches. (On CPU, placed
  arrays may alias host memory, so what stays allocated at the end is not counted.)"""
  import tracemalloc  # pylint: disable=g-import-not-at-top
  config = C.get_config("tiny_llama", vocab_size=64, depth=8, mlp_dim=256)
  lm = DecoderLM.init(config, seed=3)
  gemma_hf.save(tmp_path, layout.flatten(jax_to_numpy(lm.params)), config)
  total = sum(np.asarray(v).nbytes for v in layout.flatten(jax_to_numpy(lm.params)).values())

  def host_peak(fn):
    tracemalloc.start()
    try:
      result = fn()
      now, peak = tracemalloc.get_traced_memory()
    finally:
      tracemalloc.stop()
    return result, peak - now

  target = C.get_config("tiny_llama", vocab_size=64, depth=8, mlp_dim=256, scan_layers=scan)
  gemma_hf.load_params(tmp_path, target)  # compiles and caches what the first call needs
  params, streamed = host_peak(lambda: gemma_hf.load_params(tmp_path, target))
  # A scanned stack is one parameter: its bound is the largest stack (~55 % here) plus a block.
  _, eager = host_peak(lambda: gemma_hf.place_one_by_one(gemma_hf.load(tmp_path)[0].pop, target))
  assert eager > 0.9 * total and streamed < bound * total, (streamed, eager, total)
  again = DecoderLM(target, params)
  tokens = np.arange(10)[None] % 64
  np.testing.assert_allclose(again.logits(tokens), lm.logits(tokens), atol=1e-6)


def jax_to_numpy(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, tree)
