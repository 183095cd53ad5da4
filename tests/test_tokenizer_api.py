"""The public `DualTokenizer` API on the tiny config: shapes, consistency, saving, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform

from dualtoken_jax import DualTokenizer, DualTokens
from dualtoken_jax import config_files
from dualtoken_jax.models import config as model_config
from dualtoken_jax.bridges import flat as F
from dualtoken_jax.models.dualtoken import DualToken


def tiny_config():
  return config_files.load("configs/dualtoken_tiny.py").model


@pytest.fixture(scope="module")
def tok():
  return DualTokenizer.from_config(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def photos():
  """Two real photos (astronaut, coffee), 128x128 uint8."""
  out = [skimage.transform.resize(f(), (128, 128), anti_aliasing=True, preserve_range=True)
         for f in (skimage.data.astronaut, skimage.data.coffee)]
  return np.stack(out).round().astype(np.uint8)


def test_shapes_and_dtypes(tok, photos):
  codes = tok.encode(photos)
  assert isinstance(codes, DualTokens)
  assert codes.pixel.shape == (2, 8, 8, 4) and codes.semantic.shape == (2, 8, 8, 4)
  assert codes.pixel.dtype == jnp.int32
  assert int(codes.pixel.max()) < 512 and int(codes.pixel.min()) >= 0
  assert tok.decode(codes.pixel).shape == (2, 128, 128, 3)
  assert tok.semantic_features(photos).shape == (2, 64, 64)
  emb = tok.image_embedding(photos)
  assert emb.shape == (2, 64)
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)


def test_uint8_equals_normalised_float(tok, photos):
  as_float = photos.astype(np.float32) / 127.5 - 1
  np.testing.assert_array_equal(tok.encode(photos).pixel, tok.encode(as_float).pixel)


def test_decode_of_codes_equals_reconstruct(tok, photos):
  """Straight-through forward value == the sum of code embeddings, so both paths agree."""
  np.testing.assert_allclose(tok.decode(tok.encode(photos).pixel), tok.reconstruct(photos), atol=1e-4)


def test_code_embeddings_are_the_quantised_vectors(tok, photos):
  out = tok.encode_all(photos)
  pix, sem = tok.code_embeddings(DualTokens(out["codes_pix"], out["codes_sem"]))
  np.testing.assert_allclose(pix.reshape(2, 64, -1), out["zq_pix"], atol=1e-5)
  zq_sem = tok.model.apply(tok.variables, out["codes_sem"], method=DualToken.semantic_from_codes)
  np.testing.assert_allclose(zq_sem, out["zq_sem"], atol=1e-4)
  assert sem.shape == (2, 8, 8, 8)


def test_scan_and_remat_layouts_compute_the_same_function(tok, photos):
  cfg = tok.config.copy_and_resolve_references()
  cfg.scan_layers, cfg.remat_policy = True, "full"
  variables = F.unflatten(F.to_model_layout(F.to_loop(F.flatten(F.to_host(tok.variables))), True))
  scanned = DualTokenizer(cfg, variables)
  assert "encoderblock" in scanned.variables["params"]["img"]["Transformer"]
  np.testing.assert_array_equal(scanned.encode(photos).pixel, tok.encode(photos).pixel)
  np.testing.assert_allclose(scanned.image_embedding(photos), tok.image_embedding(photos), atol=1e-5)

  def loss(params, model, variables):  # the encoder is what scan changes; skip the CNN decoder
    out = model.apply({**variables, "params": params}, photos.astype(np.float32) / 127.5 - 1,
                      method=DualToken.encode)
    return out["quant_loss_pix"] + out["quant_loss_sem"] + jnp.mean(out["pooled"] ** 2)

  g_loop = jax.grad(loss)(tok.variables["params"], tok.model, tok.variables)
  g_scan = jax.grad(loss)(scanned.variables["params"], scanned.model, scanned.variables)
  g_scan = F.to_loop(F.flatten({"params": g_scan}))
  for k, v in F.flatten({"params": g_loop}).items():
    if k.startswith("params/img/"):
      np.testing.assert_allclose(g_scan[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
  assert np.abs(g_loop["img"]["Transformer"]["encoderblock_0"]["LayerNorm_0"]["scale"]).max() > 0


def test_training_mode_updates_codebooks_and_gradients_reach_the_encoder(tok, photos):
  x = photos.astype(np.float32) / 127.5 - 1

  def loss(params):
    out, new = tok.model.apply({**tok.variables, "params": params}, x, train=True,
                               mutable=["vq_stats"], rngs={"vq": jax.random.key(0)})
    return jnp.mean(out["recon"] ** 2) + out["quant_loss_pix"] + out["quant_loss_sem"], new

  grads, new = jax.grad(loss, has_aux=True)(tok.variables["params"])
  assert float(jnp.abs(grads["img"]["embedding"]["kernel"]).max()) > 0  # through the straight-through
  assert float(jnp.abs(grads["prequant_sem"]["proj"]["kernel"]).max()) > 0
  assert not np.allclose(new["vq_stats"]["quantizer_pix"]["codebook"],
                         tok.variables["vq_stats"]["quantizer_pix"]["codebook"])
  assert "quantizer_pix" not in grads  # codebooks are not parameters


def test_save_and_from_pretrained_round_trip(tok, photos, tmp_path):
  tok.save(tmp_path / "tok")
  again = DualTokenizer.from_pretrained(tmp_path / "tok")
  np.testing.assert_array_equal(again.encode(photos).pixel, tok.encode(photos).pixel)
  np.testing.assert_array_equal(again.reconstruct(photos), tok.reconstruct(photos))
  with pytest.raises(FileExistsError):
    tok.save(tmp_path / "tok")
  tok.save(tmp_path / "tok", overwrite=True)
  with pytest.raises(FileNotFoundError, match="not a saved DualTokenizer"):
    DualTokenizer.from_pretrained(tmp_path)


def test_text_tower(tok):
  text = tok.model.apply(tok.variables, jnp.zeros((3, 16), jnp.int32), method=DualToken.encode_text)
  assert text.shape == (3, 64)


@pytest.mark.parametrize("images,error,match", [
    (np.zeros((128, 128, 3), np.uint8), ValueError, "shape"),
    (np.zeros((1, 96, 96, 3), np.uint8), ValueError, "128, 128, 3"),
    (np.zeros((1, 128, 128, 4), np.uint8), ValueError, "shape"),
    (np.zeros((0, 128, 128, 3), np.uint8), ValueError, "empty"),
    (np.full((1, 128, 128, 3), 200.0, np.float32), ValueError, r"\[-1, 1\]"),
    (np.full((1, 128, 128, 3), np.nan, np.float32), ValueError, "NaN"),
    (np.zeros((1, 128, 128, 3), np.int64), TypeError, "uint8"),
    ([[0, 1]], TypeError, "array"),
])
def test_bad_images_fail_clearly(tok, images, error, match):
  with pytest.raises(error, match=match):
    tok.encode(images)


def test_bad_codes_fail_clearly(tok, photos):
  codes = tok.encode(photos)
  with pytest.raises(ValueError, match=r"\[0, 512\)"):
    tok.decode(codes.pixel + 1000)
  with pytest.raises(ValueError, match="shape"):
    tok.decode(codes.pixel[..., :2])
  with pytest.raises(TypeError, match="integers"):
    tok.decode(codes.pixel.astype(jnp.float32))
  with pytest.raises(ValueError, match="semantic"):
    tok.code_embeddings(DualTokens(codes.pixel, codes.semantic[:, :4]))


def test_config_validation_names_the_field():
  cfg = tiny_config()
  cfg.layer_recon = 4
  with pytest.raises(model_config.ConfigError, match="layer_recon 4 must not exceed layer_sem 3"):
    DualTokenizer.from_config(cfg)
  cfg = tiny_config()
  cfg.image_size = 112  # 7x7 grid, decoder expects 112/16 = 7: fine; then break the decoder
  cfg.decoder.ch_mult = (1, 2, 2)
  with pytest.raises(model_config.ConfigError, match="decoder_latent_shape"):
    model_config.validate(cfg)
  cfg = tiny_config()
  cfg.vq_sem.ema_update = "sometimes"
  with pytest.raises(model_config.ConfigError, match="vq_sem.ema_update"):
    model_config.validate(cfg)
  cfg = tiny_config()
  cfg.layer_sem = 9
  with pytest.raises(model_config.ConfigError, match="vision.depth"):
    model_config.validate(cfg)


@pytest.mark.parametrize("spec,grid,depth", [
    ("dualtoken_so400m:res=384", 27, 8), ("dualtoken_so400m:res=256", 16, 4),
    ("dualtoken_so400m:res=256,depth=8", 16, 8), ("dualtoken_siglip_l16", 16, 4),
    ("dualtoken_b16", 14, 4), ("dualtoken_tiny", 8, 4)])
def test_shipped_configs_validate_and_build(spec, grid, depth):
  cfg = config_files.model_of(config_files.load(spec))
  assert model_config.grid_size(cfg) == grid and cfg.vq_pix.depth == cfg.vq_sem.depth == depth
  model_config.validate(cfg)
  from dualtoken_jax.models.dualtoken import abstract_variables  # pylint: disable=g-import-not-at-top
  shapes = F.shapes(abstract_variables(cfg))
  g = model_config.grid_size(cfg)
  assert shapes["params/img/pos_embedding"] == (1, g * g, cfg.vision.width)
  assert shapes["vq_stats/quantizer_pix/codebook"] == (cfg.vq_pix.codebook_size, cfg.vq_pix.embed_dim)


def test_config_args_are_typed_and_checked():
  with pytest.raises(ValueError, match="unknown config arg 'rez'"):
    config_files.load("dualtoken_so400m:rez=256")
  with pytest.raises(ValueError, match="res must be 384 or 256"):
    config_files.load("dualtoken_so400m:res=300")
