"""Loss functions against hand-computed values and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualtoken_jax.losses import gan, semantic
from dualtoken_jax.tokenizer_training import recipe


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


# --------------------------------------------------------------------------- semantic terms
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
  w = semantic.SemanticWeights(**recipe.loss_config(stage).semantic)
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


def test_semantic_loss_teacher_gets_no_gradient():
  rs = np.random.RandomState(0)
  args = [jnp.asarray(a) for a in (rs.standard_normal((1, 4, 8)), rs.standard_normal((1, 4, 8)),
                                   rs.standard_normal((1, 8)), rs.standard_normal((1, 8)))]
  weights = semantic.SemanticWeights(**recipe.loss_config(1).semantic)
  loss = lambda *a: semantic.semantic_loss(*a, weights)[0]
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
  assert np.abs(np.asarray(grads[0])).max() > 0 and np.abs(np.asarray(grads[2])).max() > 0
  assert not np.asarray(grads[1]).any() and not np.asarray(grads[3]).any()


def test_semantic_loss_rejects_mismatched_shapes():
  a = jnp.zeros((1, 4, 8))
  with pytest.raises(ValueError, match="shapes differ"):
    semantic.semantic_loss(a, jnp.zeros((1, 5, 8)), jnp.zeros((1, 8)), jnp.zeros((1, 8)),
                           semantic.SemanticWeights(1.0, 1.0, 1.0, 1.0))
