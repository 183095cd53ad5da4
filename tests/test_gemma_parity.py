"""The Gemma decoder against HF Gemma 2 / Gemma 3 golden outputs; layouts, masks and sharding."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from dualtoken_jax.bridges import hf_config
from dualtoken_jax.llm import GemmaLM
from dualtoken_jax.llm import attention
from dualtoken_jax.llm import config as C
from dualtoken_jax.llm import gemma
from dualtoken_jax.llm import masks

GEMMA = pathlib.Path(__file__).parent / "fixtures" / "gemma"
FAMILIES = ("gemma2", "gemma3")
ATOL = 1e-4


@pytest.fixture(scope="module")
def fixtures():
  """family -> (GemmaLM loaded through from_hf, golden arrays)."""
  return {f: (GemmaLM.from_hf(GEMMA / f), dict(np.load(GEMMA / f / "golden.npz")))
          for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_hidden_states_match_hf(fixtures, family):
  lm, golden = fixtures[family]
  logits, out = lm.forward(golden["tokens"], return_hidden=True)
  np.testing.assert_allclose(logits, golden["logits"], atol=ATOL, rtol=0)
  # HF's hidden_states: the embedding output, each layer's output but the last, then the last
  # layer's output after the final norm.
  hidden = np.concatenate([np.asarray(out["hidden"][:-1]), np.asarray(out["pre_logits"])[None]])
  assert hidden.shape == golden["hidden_states"].shape
  np.testing.assert_allclose(hidden, golden["hidden_states"], atol=ATOL, rtol=0)


def test_config_from_hf_reads_every_feature(fixtures):
  g2, g3 = fixtures["gemma2"][0].config, fixtures["gemma3"][0].config
  assert (g2.attention_pattern, g2.sliding_window) == (("local", "global"), 8)
  assert (g2.attn_logit_softcap, g2.final_logit_softcap) == (50.0, 30.0)
  assert g2.post_attn_norm and not g2.qk_norm and g2.rope_base_local == g2.rope_base_global == 1e4
  assert g3.attention_pattern == ("local", "global") and g3.qk_norm
  assert (g3.attn_logit_softcap, g3.final_logit_softcap) == (None, None)
  assert (g3.rope_base_local, g3.rope_base_global) == (1e4, 1e6)
  assert g3.query_pre_attn_scalar == 16 and g3.num_kv_heads == 2


def test_scan_layout_matches_loop(fixtures):
  lm, golden = fixtures["gemma2"]
  scanned = GemmaLM.from_hf(GEMMA / "gemma2", scan_layers=True, remat_policy="full")
  assert scanned.params["layers"]["attn"]["q_einsum"]["w"].shape[0] == lm.config.depth
  assert "layer_0" not in scanned.params
  logits, out = scanned.forward(golden["tokens"], return_hidden=True)
  np.testing.assert_allclose(logits, lm.forward(golden["tokens"], return_hidden=True)[0],
                             atol=1e-5, rtol=0)
  assert out["hidden"].shape[0] == lm.config.depth + 1


def test_remat_policies_by_name():
  policies = jax.checkpoint_policies
  assert gemma.remat_policy("none") is None
  assert gemma.remat_policy("full") is policies.nothing_saveable
  assert gemma.remat_policy("dots") is policies.dots_saveable
  assert gemma.remat_policy("dots_no_batch") is policies.dots_with_no_batch_dims_saveable


def test_sharded_forward_matches_single_device(fixtures):
  lm, golden = fixtures["gemma3"]
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  # Also runs the loop layout under nn.remat (the scan test covers jax.checkpoint in scan).
  sharded = GemmaLM.from_hf(GEMMA / "gemma3", mesh=mesh, remat_policy="dots_no_batch")
  q = sharded.params["layer_0"]["attn"]["q_einsum"]["w"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp", None)
  assert len(q.sharding.device_set) == 8
  np.testing.assert_allclose(sharded.logits(golden["tokens"]), lm.logits(golden["tokens"]),
                             atol=1e-5, rtol=0)


def test_random_init_lands_in_shardings():
  mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  config = C.get_config("tiny", depth=1, num_kv_heads=1, scan_layers=True)
  params = GemmaLM.init(config, seed=0, mesh=mesh).params
  spec = lambda a: a.sharding.spec
  assert spec(params["embedder"]["input_embedding"]) == jax.sharding.PartitionSpec("tensor", "fsdp")
  # One KV head cannot be split over the 2-way tensor axis: that axis is replicated instead.
  kv = params["layers"]["attn"]["kv_einsum"]["w"]
  assert kv.shape == (1, 2, 1, 64, 16)
  assert spec(kv) == jax.sharding.PartitionSpec(None, None, None, "fsdp", None)
  np.testing.assert_array_equal(params["layers"]["pre_attention_norm"]["scale"], 0.0)  # 1 + 0
  table = np.asarray(params["embedder"]["input_embedding"])
  assert 0.8 < table.std() * np.sqrt(config.width) < 1.2


@functools.partial(jax.jit, static_argnums=0)
def _logits_with_prefix(model, params, tokens, prefix, attn_mask):
  return model.apply({"params": params}, tokens, attn_mask=attn_mask, embedded_prefix=prefix)[0]


def test_embedded_prefix_is_not_scaled_and_prefix_lm_is_bidirectional(fixtures):
  lm, golden = fixtures["gemma3"]
  apply = functools.partial(_logits_with_prefix, lm.model, lm.params)
  tokens = jnp.asarray(golden["tokens"])
  emb = lm.params["embedder"]["input_embedding"]
  causal = masks.causal_mask(2, 20)
  scaled = emb[tokens[:, :5]] * np.sqrt(lm.config.width)
  # A prefix of already-scaled token embeddings reproduces the plain token forward...
  np.testing.assert_allclose(apply(tokens[:, 5:], scaled, causal),
                             golden["logits"], atol=ATOL, rtol=0)
  # ...and raw table rows are not scaled again: they give other logits.
  raw = apply(tokens[:, 5:], emb[tokens[:, :5]], causal)
  assert np.abs(np.asarray(raw) - golden["logits"]).max() > 1e-2
  # Prefix-LM: the first 5 positions attend to each other in both directions.
  mask_ar = jnp.asarray([[0] * 5 + [1] * 15] * 2)
  prefix_lm = masks.make_attn_mask(jnp.ones((2, 20), bool), mask_ar)
  changed = scaled.at[:, 4].multiply(-1.0)
  a = apply(tokens[:, 5:], scaled, prefix_lm)
  b = apply(tokens[:, 5:], changed, prefix_lm)
  assert np.abs(np.asarray(a[:, 0]) - np.asarray(b[:, 0])).max() > 1e-3  # position 0 sees 4
  c = apply(tokens[:, 5:], changed, causal)
  np.testing.assert_allclose(c[:, :4], golden["logits"][:, :4], atol=ATOL, rtol=0)


def test_mask_helpers():
  input_mask = jnp.asarray([[True, True, True, True], [False, True, True, True]])
  mask_ar = jnp.asarray([[0, 0, 1, 1], [0, 0, 0, 1]])
  expected = np.array([[[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],
                       [[0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 1]]], bool)
  np.testing.assert_array_equal(masks.make_attn_mask(input_mask, mask_ar), expected)
  np.testing.assert_array_equal(masks.positions_from_mask(input_mask), [[0, 1, 2, 3], [0, 0, 1, 2]])
  causal = masks.causal_padding_mask(jnp.asarray([[True, True, False]]))
  np.testing.assert_array_equal(causal[0], [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
  step = masks.decode_step_mask(jnp.asarray([[False, True, True, False, False]]), 3)
  np.testing.assert_array_equal(step, [[[False, True, True, False, False]]])


def test_sliding_window_keeps_window_keys_only():
  pos = jnp.arange(20)[None]
  full = masks.causal_mask(1, 20)
  local = np.asarray(attention.window_mask(full, pos, pos, 8))[0]
  assert local[19, 12] and not local[19, 11]  # HF: a query sees itself and 7 earlier keys
  assert local[19].sum() == 8 and local[3].sum() == 4
  unlimited = attention.window_mask(full, pos, pos, C.NO_WINDOW)
  np.testing.assert_array_equal(unlimited, full)


def test_layer_schedule_follows_pattern():
  config = C.get_config("gemma3_4b")
  schedule = C.layer_schedule(config)
  local = [t == "local" for t in C.layer_types(config)]
  assert local[:6] == [True] * 5 + [False] and len(local) == 34
  assert schedule["window"][0] == 1024 and schedule["window"][5] == C.NO_WINDOW
  assert schedule["rope_base"][0] == 1e4 and schedule["rope_base"][5] == 1e6
  assert schedule["rope_scale"][0] == 1.0 and schedule["rope_scale"][5] == 8.0


def test_released_configs_validate_and_bad_ones_fail():
  for variant in C.VARIANTS:
    C.validate(C.get_config(variant))
  assert C.uses_qkv_einsum(C.get_config("gemma_7b"))
  assert C.get_config("gemma2_27b").query_pre_attn_scalar == 144
  with pytest.raises(C.ConfigError, match="num_kv_heads"):
    C.get_config("tiny", num_kv_heads=3)
  with pytest.raises(C.ConfigError, match="sliding_window"):
    C.get_config("tiny", sliding_window=None)
  with pytest.raises(C.ConfigError, match="remat_policy"):
    C.get_config("tiny", remat_policy="sometimes")
  with pytest.raises(C.ConfigError, match="unknown decoder variant"):
    C.get_config("gemma4_1b")
  with pytest.raises(C.ConfigError, match="unknown config field"):
    C.get_config("tiny", windw=3)
