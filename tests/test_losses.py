"""Loss functions against hand-computed values, closed forms and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualtoken_jax.losses import gan, reconstruction, semantic
from dualtoken_jax.models.pixel_decoder import Decoder


# --------------------------------------------------------------------------- GAN terms
def test_discriminator_loss_by_hand():
  real = jnp.array([2.0, 0.5, -1.0])  # 1 − real = (−1, 0.5, 2) -> lrelu (−0.01, 0.5, 2): mean 0.83
  fake = jnp.array([-2.0, 0.0, 1.0])  # 1 + fake = (−1, 1, 2)   -> lrelu (−0.01, 1, 2):   mean 2.99/3
  want = 0.5 * (0.83 + 2.99 / 3)
  np.testing.assert_allclose(float(gan.discriminator_loss(real, fake)), want, rtol=1e-6)
  np.testing.assert_allclose(float(gan.discriminator_loss(real, fake, weight=0.75)), 0.75 * want, rtol=1e-6)
  # A plain hinge (ReLU) would give 0.5·(2.5/3 + 1): the leaky part must be there.
  assert abs(float(gan.discriminator_loss(real, fake)) - 0.5 * (2.5 / 3 + 1.0)) > 1e-3


def test_discriminator_loss_on_logit_maps_and_bf16():
  rs = np.random.RandomState(0)
  real, fake = rs.standard_normal((2, 2, 6, 6, 1)) * 2
  lrelu = lambda v: np.where(v > 0, v, 0.01 * v)
  want = 0.5 * (lrelu(1 - real).mean() + lrelu(1 + fake).mean())
  got = gan.discriminator_loss(jnp.asarray(real, jnp.bfloat16), jnp.asarray(fake, jnp.bfloat16))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=2e-2)  # inputs rounded to bf16
  np.testing.assert_allclose(float(gan.discriminator_loss(jnp.asarray(real), jnp.asarray(fake))), want, rtol=1e-5)


def test_discriminator_loss_weight_schedule():
  assert gan.discriminator_loss_weight(epoch=0, gan_start_epoch=0) == 1.0
  assert gan.discriminator_loss_weight(epoch=1, gan_start_epoch=0) == 0.75
  assert gan.discriminator_loss_weight(epoch=2, gan_start_epoch=3) == 0.75
  assert gan.discriminator_loss_weight(epoch=3, gan_start_epoch=3, weight=0.5) == 1.0


def test_generator_loss():
  logits = jnp.arange(6.0).reshape(1, 2, 3, 1)
  np.testing.assert_allclose(float(gan.generator_loss(logits)), -2.5)
  np.testing.assert_allclose(np.asarray(jax.grad(gan.generator_loss)(logits)), -np.ones((1, 2, 3, 1)) / 6)


@pytest.mark.parametrize("nll_grad, g_grad, want", [
    ([[3.0, 0.0], [0.0, 0.0]], [[0.0, 4.0], [0.0, 0.0]], 3.0 / (4.0 + 1e-4)),  # ‖·‖ 3 and 4
    ([[30.0, 40.0]], [[0.3, 0.4]], 10.0),    # ratio 100 -> clamped to 10
    ([[0.03, 0.04]], [[3.0, 4.0]], 0.3),     # ratio 0.01 -> clamped to 0.3
    ([[1.0, 0.0]], [[0.0, 0.0]], 10.0),      # no generator gradient: 1 / 1e-4 -> 10
    ([[2e-4, 0.0]], [[1e-4, 0.0]], 1.0),     # eps matters: 2e-4 / (1e-4 + 1e-4)
])
def test_adaptive_gan_weight(nll_grad, g_grad, want):
  got = gan.adaptive_gan_weight(jnp.asarray(nll_grad), jnp.asarray(g_grad))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_adaptive_gan_weight_is_a_constant():
  nll_grad, g_grad = jnp.array([1.0, 2.0]), jnp.array([2.0, 2.0])
  d_nll, d_g = jax.grad(lambda a, b: gan.adaptive_gan_weight(a, b), argnums=(0, 1))(nll_grad, g_grad)
  assert not np.asarray(d_nll).any() and not np.asarray(d_g).any()


def test_last_layer_grads_closed_form_and_finite_differences():
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.standard_normal((5, 3)))
  t = jnp.asarray(rs.standard_normal((5, 2)))
  w = jnp.asarray(rs.standard_normal((3, 2)))
  nll = lambda k: jnp.mean((x @ k - t) ** 2)
  g = lambda k: -jnp.mean(jnp.tanh(x @ k))
  d_nll, d_g = gan.last_layer_grads(nll, g, w)
  xn, tn, wn = map(np.asarray, (x, t, w))
  np.testing.assert_allclose(np.asarray(d_nll), 2 / 10 * xn.T @ (xn @ wn - tn), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(d_g), -1 / 10 * xn.T @ (1 - np.tanh(xn @ wn) ** 2), rtol=1e-5)
  h = 1e-3  # central differences on every entry
  for fn, grad in ((jax.jit(nll), d_nll), (jax.jit(g), d_g)):
    for i in range(3):
      for j in range(2):
        e = jnp.zeros((3, 2)).at[i, j].set(h)
        fd = (float(fn(w + e)) - float(fn(w - e))) / (2 * h)
        np.testing.assert_allclose(fd, float(grad[i, j]), rtol=2e-3, atol=1e-5)
  want = np.linalg.norm(2 / 10 * xn.T @ (xn @ wn - tn)) / (np.linalg.norm(np.asarray(d_g)) + 1e-4)
  np.testing.assert_allclose(float(gan.adaptive_gan_weight(d_nll, d_g)), np.clip(want, 0.3, 10), rtol=1e-5)


def test_last_layer_grads_on_the_decoder_conv_out():
  """Through `replace_leaf`, the leaf gradient equals that leaf of the full parameter gradient."""
  decoder = Decoder(ch=32, ch_mult=(1,), num_res_blocks=0, attn_resolutions=())
  z = jnp.asarray(np.random.RandomState(0).standard_normal((2, 4, 4, 8)), jnp.float32)
  target = jnp.asarray(np.random.RandomState(1).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
  params = {"decoder": jax.jit(decoder.init)(jax.random.key(0), z)["params"]}
  recon = lambda p: decoder.apply({"params": p["decoder"]}, z)
  nll = lambda p: reconstruction.pixel_mse(recon(p), target)
  g = lambda p: gan.generator_loss(jnp.tanh(recon(p)))  # any scalar of x̂ stands in for −mean(D(x̂))
  assert gan.get_leaf(params).shape == (3, 3, 32, 3)

  @jax.jit
  def both_ways(p):
    leaf_grads = gan.last_layer_grads(lambda k: nll(gan.replace_leaf(p, gan.LAST_LAYER, k)),
                                      lambda k: g(gan.replace_leaf(p, gan.LAST_LAYER, k)), gan.get_leaf(p))
    return leaf_grads, (gan.get_leaf(jax.grad(nll)(p)), gan.get_leaf(jax.grad(g)(p)))

  (d_nll, d_g), (want_nll, want_g) = both_ways(params)
  np.testing.assert_allclose(np.asarray(d_nll), np.asarray(want_nll), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(d_g), np.asarray(want_g), rtol=1e-5)
  assert float(jnp.abs(d_nll).max()) > 0 and float(jnp.abs(d_g).max()) > 0


def test_leaf_helpers():
  tree = {"decoder": {"conv_out": {"kernel": 1, "bias": 2}}, "other": {"x": 3}}
  assert gan.get_leaf(tree) == 1 and gan.get_leaf(tree, ("other", "x")) == 3
  new = gan.replace_leaf(tree, "decoder/conv_out/kernel", 5)
  assert new == {"decoder": {"conv_out": {"kernel": 5, "bias": 2}}, "other": {"x": 3}}
  assert tree["decoder"]["conv_out"]["kernel"] == 1 and new["other"] is tree["other"]
  with pytest.raises(KeyError, match=r"decoder/conv_out holds \['bias', 'kernel'\]"):
    gan.get_leaf(tree, "decoder/conv_out/weight")
  with pytest.raises(KeyError, match="the root holds"):
    gan.replace_leaf(tree, "encoder/conv_out/kernel", 0)


# --------------------------------------------------------------------------- semantic terms
def test_mse_minus_cos_by_hand():
  s, t = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]])
  np.testing.assert_allclose(float(semantic.mse_minus_cos(s, t)), 0.25 - 1.0, rtol=1e-6)  # mse 1/4, cos 1
  s, t = jnp.array([[1.0, 1.0]]), jnp.array([[1.0, 0.0]])
  np.testing.assert_allclose(float(semantic.mse_minus_cos(s, t)), 0.5 - 2 ** -0.5, rtol=1e-6)


def test_cosine_similarity_follows_torch():
  # Torch clamps each norm at 1e-8: cos([1e-9, 0], [1e-9, 0]) = 1e-18 / (1e-8)² = 0.01 there.
  tiny = jnp.array([1e-9, 0.0])
  np.testing.assert_allclose(float(semantic.cosine_similarity(tiny, tiny)), 0.01, rtol=1e-4)
  assert float(semantic.cosine_similarity(jnp.array([3.0, 4.0]), jnp.zeros(2))) == 0.0
  g = jax.grad(lambda a: semantic.cosine_similarity(a, jnp.array([1.0, 2.0])))(jnp.zeros(2))
  assert np.all(np.isfinite(np.asarray(g)))


def _np_mse_minus_cos(s, t, w_mse=1.0, w_cos=1.0):
  cos = (s * t).sum(-1) / (np.maximum(np.linalg.norm(s, axis=-1), 1e-8) * np.maximum(np.linalg.norm(t, axis=-1), 1e-8))
  return w_mse * ((s - t) ** 2).mean() - w_cos * cos.mean()


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_semantic_loss_stages(stage):
  rs = np.random.RandomState(stage)
  zq, t26 = rs.standard_normal((2, 2, 9, 16))
  pooled, tpool = rs.standard_normal((2, 2, 16))
  w = semantic.STAGE_WEIGHTS[stage]
  loss, parts = semantic.semantic_loss(*map(jnp.asarray, (zq, t26, pooled, tpool)), weights=w)
  want = (_np_mse_minus_cos(zq, t26, w.token_mse, w.token_cos)
          + _np_mse_minus_cos(pooled, tpool, w.pool_mse, w.pool_cos))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(parts["token_mse"]), ((zq - t26) ** 2).mean(), rtol=1e-5)
  # Spec B.2, term by term.
  tok, pool = _np_mse_minus_cos(zq, t26), _np_mse_minus_cos(pooled, tpool)
  tok_cos = -_np_mse_minus_cos(zq, t26, w_mse=0.0)
  spec = {0: 5 * pool, 1: 5 * tok + pool, 2: -tok_cos + 5 * pool}[stage]
  np.testing.assert_allclose(float(loss), spec, rtol=1e-5)


def test_semantic_loss_default_is_stage_1_and_teacher_gets_no_gradient():
  rs = np.random.RandomState(0)
  args = [jnp.asarray(a) for a in (rs.standard_normal((1, 4, 8)), rs.standard_normal((1, 4, 8)),
                                   rs.standard_normal((1, 8)), rs.standard_normal((1, 8)))]
  loss = lambda *a: semantic.semantic_loss(*a)[0]
  np.testing.assert_allclose(float(loss(*args)),
                             float(semantic.semantic_loss(*args, weights=semantic.STAGE_WEIGHTS[1])[0]))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
  assert np.abs(np.asarray(grads[0])).max() > 0 and np.abs(np.asarray(grads[2])).max() > 0
  assert not np.asarray(grads[1]).any() and not np.asarray(grads[3]).any()


def test_semantic_loss_rejects_mismatched_shapes():
  a = jnp.zeros((1, 4, 8))
  with pytest.raises(ValueError, match="shapes differ"):
    semantic.semantic_loss(a, jnp.zeros((1, 5, 8)), jnp.zeros((1, 8)), jnp.zeros((1, 8)))


# --------------------------------------------------------------------------- reconstruction
def test_pixel_mse_and_perceptual_wrappers():
  x = jnp.array([[[[1.0, -1.0, 0.5]]], [[[0.0, 0.0, 0.0]]]])  # (2, 1, 1, 3)
  y = jnp.array([[[[0.0, -1.0, 0.0]]], [[[0.0, 1.0, 0.0]]]])
  np.testing.assert_allclose(float(reconstruction.pixel_mse(x, y)), (1 + 0.25 + 1) / 6, rtol=1e-6)
  fake_lpips = lambda a, b: jnp.sum(jnp.abs(a - b), axis=(1, 2, 3))  # (2,): 1.5 and 1.0
  np.testing.assert_allclose(float(reconstruction.perceptual_loss(fake_lpips, x, y)), 1.25, rtol=1e-6)
  np.testing.assert_allclose(float(reconstruction.nll_loss(fake_lpips, x, y, perceptual_weight=2.0)),
                             2.25 / 6 + 2 * 1.25, rtol=1e-6)
  with pytest.raises(ValueError, match="one distance per image"):
    reconstruction.perceptual_loss(lambda a, b: jnp.sum(jnp.abs(a - b)), x, y)
