"""Parity with the PyTorch reference tokenizer (fixture: tests/fixtures/dualtoken_ref_a).

The fixture was produced by running the public reference on small random weights; see its
README. Tolerances are the ones a faithful float32 port reaches.
"""

import importlib.util

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import FIXTURES

from dualtoken_jax import DualTokenizer
from dualtoken_jax.bridges import dualtoken as weights
from dualtoken_jax.bridges import layout
from dualtoken_jax.models.dualtoken import DualToken, vision_tower
from dualtoken_jax.quantization.quantizer import ResidualQuantizer

REF = FIXTURES / "dualtoken_ref_a"
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(REF / "golden.npz"))


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def load(checkpoint, scan):
  tok = DualTokenizer.from_reference(REF / checkpoint, REF / "config.json")
  if scan:  # same weights, stacked-block layout
    cfg = ml_collections.ConfigDict(tok.config.to_dict())
    cfg.scan_layers = True
    variables = layout.unflatten(layout.to_scan(layout.to_loop(layout.flatten(layout.to_host(tok.variables)))))
    tok = DualTokenizer(cfg, variables)
  return tok


CASES = [("checkpoint.safetensors", False), ("checkpoint.safetensors", True),
         pytest.param("checkpoint.pt", False,
                      marks=pytest.mark.skipif(not HAS_TORCH, reason="reading .pt needs torch"))]


@pytest.mark.parametrize("checkpoint,scan", CASES)
def test_forward_matches_reference(golden, checkpoint, scan):
  tok = load(checkpoint, scan)
  images = nhwc(golden["images"])
  out = tok.model.apply(tok.variables, jnp.asarray(images), collect_hidden=True)

  np.testing.assert_array_equal(out["codes_pix"], golden["code_pix"])
  np.testing.assert_array_equal(out["codes_sem"], golden["code_sem"])
  for name, key in [("zq_sem", "zq_sem"), ("pooled", "pooled"), ("image_embeds", "image_embeds"),
                    ("hidden_states", "hidden_states")]:
    np.testing.assert_allclose(out[name], golden[key], atol=1e-4, rtol=0, err_msg=name)
  np.testing.assert_allclose(out["recon"], nhwc(golden["recon"]), atol=1e-3)
  np.testing.assert_allclose(out["quant_loss_pix"], golden["quant_loss_pix"], atol=1e-5)
  np.testing.assert_allclose(out["quant_loss_sem"], golden["quant_loss_sem"], atol=1e-5)


def test_public_api_matches_reference(golden):
  tok = load("checkpoint.safetensors", scan=False)
  images = nhwc(golden["images"])
  codes = tok.encode(images)
  np.testing.assert_array_equal(codes.pixel, golden["code_pix"])
  np.testing.assert_array_equal(codes.semantic, golden["code_sem"])
  assert codes.pixel.dtype == jnp.int32
  np.testing.assert_allclose(tok.decode(codes.pixel), nhwc(golden["recon_from_codes"]), atol=1e-3)
  np.testing.assert_allclose(tok.reconstruct(images), nhwc(golden["recon"]), atol=1e-3)
  np.testing.assert_allclose(tok.semantic_features(images), golden["zq_sem"], atol=1e-4)
  np.testing.assert_allclose(tok.image_embedding(images), golden["image_embeds"], atol=1e-4)
  pix, sem = tok.code_embeddings(codes)
  np.testing.assert_allclose(pix, golden["code_emb_pix"], atol=1e-6)
  np.testing.assert_allclose(sem, golden["code_emb_sem"], atol=1e-6)


def test_pixel_ema_pass_matches_reference(golden):
  """One training-mode pass of the pixel ("rq", per-level EMA) quantizer, restarts off."""
  tok = load("checkpoint.safetensors", scan=False)
  q = tok.config.vq_pix
  quantizer = ResidualQuantizer(codebook_size=q.codebook_size, embed_dim=q.embed_dim, depth=q.depth,
                                restart_unused_codes=False, ema_update="per_level")
  stats = tok.variables["vq_stats"]["quantizer_pix"]
  out, new = quantizer.apply({"vq_stats": stats}, jnp.asarray(golden["ema_input"]), train=True,
                             mutable=["vq_stats"])
  new = new["vq_stats"]
  np.testing.assert_array_equal(out.codes, golden["ema_codes"])
  np.testing.assert_allclose(out.quantized, golden["ema_zq"], atol=1e-5)
  np.testing.assert_allclose(out.loss, golden["ema_loss"], atol=1e-5)
  np.testing.assert_allclose(new["codebook"], golden["ema_codebook"], atol=1e-5)
  np.testing.assert_allclose(new["cluster_size"], golden["ema_cluster_size"], atol=1e-5)
  np.testing.assert_allclose(new["embed_sum"], golden["ema_embed_sum"], atol=1e-5)
  # A pass that does update must move the table; otherwise this test could not fail.
  assert not np.allclose(new["codebook"], stats["codebook"])


@pytest.mark.parametrize("scan", [False, True])
def test_hf_siglip_teacher_matches_reference(golden, scan):
  config = load("checkpoint.safetensors", scan).config  # the fixture's SigLIP tower
  params = weights.init_with_siglip(config, REF / "siglip")["params"]["img"]
  module = vision_tower(config)
  pooled, hidden = module.apply({"params": params}, jnp.asarray(nhwc(golden["images"])), collect=True)
  np.testing.assert_allclose(hidden, golden["teacher_hidden_states"], atol=1e-4)
  np.testing.assert_allclose(pooled, golden["teacher_pooled"], atol=1e-4)


def test_teacher_differs_from_student(golden):
  """The fixture's student and teacher weights differ, so teacher parity is not a tautology."""
  tok = load("checkpoint.safetensors", scan=False)
  pooled = tok.model.apply(tok.variables, jnp.asarray(nhwc(golden["images"])), method=DualToken.teacher)
  assert np.abs(np.asarray(pooled) - golden["teacher_pooled"]).max() > 1e-3
