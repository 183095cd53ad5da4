"""The public `DualTokenizer` API on the tiny config: shapes, consistency, saving, bad inputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform

from dualtoken_jax import DualTokenizer, DualTokens
from dualtoken_jax import config_files
from dualtoken_jax.models import config as model_config
from dualtoken_jax.bridges import layout
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
  variables = layout.unflatten(layout.to_scan(layout.to_loop(layout.flatten(layout.to_host(tok.variables)))))
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
  g_scan = layout.to_loop(layout.flatten({"params": g_scan}))
  for k, v in layout.flatten({"params": g_loop}).items():
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


def test_siglip_embedding_is_the_plain_tower_without_the_quantiser(tok, photos):
  emb = tok.siglip_embedding(photos)
  by_hand = tok.model.apply(tok.variables, photos.astype(np.float32) / 127.5 - 1,
                            method=lambda m, x: m.img(x))  # the SigLIP tower alone
  by_hand = np.asarray(by_hand) / np.linalg.norm(by_hand, axis=-1, keepdims=True)
  assert emb.shape == (2, 64)
  np.testing.assert_allclose(emb, by_hand, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  # The quantised semantic path replaces block layer_sem's output: a different embedding.
  assert np.abs(np.asarray(emb) - np.asarray(tok.image_embedding(photos))).max() > 1e-2
  with pytest.raises(ValueError, match="128, 128, 3"):
    tok.siglip_embedding(photos[:, :64])


def test_from_pretrained_reads_an_older_config_json(tok, photos, tmp_path):
  """A config.json written before some fields existed loads with those fields' defaults."""
  tok.save(tmp_path / "old")
  path = tmp_path / "old" / "config.json"
  saved = json.loads(path.read_text())
  for fields in (saved, saved["decoder"], saved["vq_pix"], saved["vq_sem"]):
    for key in ("attention_chunk", "remat", "distance_chunk"):
      fields.pop(key, None)
  del saved["projection_heads"], saved["text"]["layer_norm_eps"]
  path.write_text(json.dumps(saved))
  again = DualTokenizer.from_pretrained(tmp_path / "old")
  c = again.config
  assert c.attention_chunk == 0 and c.decoder.remat is False and c.projection_heads is None
  assert c.vq_pix.distance_chunk == c.vq_sem.distance_chunk == 2048
  assert c.text.layer_norm_eps == 1e-6
  assert c.decoder.ch_mult == (1, 1, 2, 2, 4) and isinstance(c.decoder.attn_resolutions, tuple)
  assert c.to_dict() == tok.config.to_dict()
  np.testing.assert_array_equal(again.encode(photos).pixel, tok.encode(photos).pixel)


def test_config_from_dict_merges_over_defaults_and_names_missing_fields():
  cfg = tiny_config()
  saved = json.loads(cfg.to_json_best_effort())
  saved["decoder_latent_shape"] = [8, 8]
  del saved["scan_layers"]
  loaded = model_config.from_dict(saved)
  assert loaded.decoder_latent_shape == (8, 8) and loaded.scan_layers is False
  assert loaded.vq_sem.ema_update == "pooled" and loaded.text.vocab_size == 1000
  del saved["vision"]["patch_size"], saved["layer_sem"]
  with pytest.raises(model_config.ConfigError, match="layer_sem, vision.patch_size"):
    model_config.from_dict(saved)


def test_text_tower(tok):
  tokens = np.random.default_rng(0).integers(0, 1000, (3, 16)).astype(np.int32)
  text = tok.text_embedding(tokens)
  assert text.shape == (3, 64) and text.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(text, axis=-1), 1.0, rtol=1e-5)
  by_hand = np.asarray(tok.model.apply(tok.variables, tokens, method=lambda m, t: m.txt(t)))
  np.testing.assert_allclose(text, by_hand / np.linalg.norm(by_hand, axis=-1, keepdims=True),
                             atol=1e-5)
  np.testing.assert_allclose(text, tok.model.apply(tok.variables, tokens,
                                                   method=DualToken.encode_text), atol=1e-6)
  assert np.abs(np.asarray(text[0]) - np.asarray(text[1])).max() > 1e-2  # depends on the tokens
  # The last token is read, so a shorter prompt is a different (valid) input.
  assert tok.text_embedding(tokens[:, :5]).shape == (3, 64)


@pytest.mark.parametrize("tokens,error,match", [
    (np.zeros((16,), np.int32), ValueError, "shape"),
    (np.zeros((1, 17), np.int32), ValueError, "16"),
    (np.zeros((0, 16), np.int32), ValueError, "empty"),
    (np.zeros((1, 16), np.float32), TypeError, "integers"),
    (np.full((1, 16), 1000, np.int32), ValueError, r"\[0, 1000\)"),
    ([[1, 2]], TypeError, "array"),
])
def test_bad_text_tokens_fail_clearly(tok, tokens, error, match):
  with pytest.raises(error, match=match):
    tok.text_embedding(tokens)


def test_text_embedding_without_a_text_tower_says_so():
  cfg = tiny_config()
  cfg.text = None
  with pytest.raises(ValueError, match="no text tower"):
    DualTokenizer(cfg, {}).text_embedding(np.zeros((1, 16), np.int32))


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
  shapes = layout.shapes(abstract_variables(cfg))
  g = model_config.grid_size(cfg)
  assert shapes["params/img/pos_embedding"] == (1, g * g, cfg.vision.width)
  assert shapes["vq_stats/quantizer_pix/codebook"] == (cfg.vq_pix.codebook_size, cfg.vq_pix.embed_dim)


def test_config_args_are_typed_and_checked():
  with pytest.raises(ValueError, match="unknown config arg 'rez'"):
    config_files.load("dualtoken_so400m:rez=256")
  with pytest.raises(ValueError, match="res must be 384 or 256"):
    config_files.load("dualtoken_so400m:res=300")
