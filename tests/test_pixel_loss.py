"""The memory-saving evaluation orders compute what the plain formulation does: query-blocked
attention, batch-chunked decoder/LPIPS/D, and x̂'s cotangent formed once for λ and the backward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dualtoken_jax import config_files, data

from dualtoken_jax.parallel import sharding
from dualtoken_jax.losses import gan as G
from dualtoken_jax.models import lpips as lpips_model
from dualtoken_jax.models.chunked_attention import query_chunked
from dualtoken_jax.models.discriminator import PatchDiscriminator
from dualtoken_jax.models.dualtoken import DualToken, init_variables
from dualtoken_jax.tokenizer_training import pixel_loss as PL
from dualtoken_jax.training.state import activation_sharding

SIZE = 32  # configs/demo_cpu.py:test


@pytest.mark.parametrize("causal", [False, True])
def test_query_chunked_attention_equals_full(causal):
  """29 queries in blocks of 5 (the last one padded): values and gradients."""
  q, k, v, w = (jax.random.normal(jax.random.key(i), (2, 29, 3, 8)) for i in range(4))
  mask = nn.make_causal_mask(jnp.ones((2, 29), bool)) if causal else None
  def loss(attend, q, k, v):
    return jnp.sum(w * attend(q, k, v, mask=mask))
  full = jax.value_and_grad(lambda *a: loss(nn.dot_product_attention, *a), argnums=(0, 1, 2))(q, k, v)
  chunked = jax.jit(jax.value_and_grad(lambda *a: loss(query_chunked(5), *a), argnums=(0, 1, 2)))(q, k, v)
  for x, y in zip(jax.tree.leaves(chunked), jax.tree.leaves(full)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def demo_model_config(**overrides):
  config = config_files.load("configs/demo_cpu.py:test")
  config.model.update(overrides)
  return config


def test_encoder_with_attention_blocks_equals_full():
  """Tower and projections with 16 tokens attended 5 queries at a time (padded): same outputs."""
  config = demo_model_config().model
  variables = init_variables(config, jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (2, SIZE, SIZE, 3), minval=-1, maxval=1)
  encode = lambda c: DualToken(ml_collections.FrozenConfigDict(c)).apply(variables, images, decode=False)
  full = encode(config)
  chunked = config.copy_and_resolve_references()
  chunked.attention_chunk = 5
  blocked = encode(chunked)
  for key in ("zq_sem", "pooled", "zq_pix"):
    np.testing.assert_allclose(blocked[key], full[key], rtol=1e-5, atol=1e-5, err_msg=key)
  np.testing.assert_array_equal(blocked["codes_pix"], full["codes_pix"])


def test_map_chunks_keeps_order_and_sums_on_a_mesh():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  x = jnp.arange(32 * 3, dtype=jnp.float32).reshape(32, 3)
  batch = data.batch_sharding(mesh)

  def f(x):
    with activation_sharding(sharding.DEFAULT_RULES, mesh):
      assert PL.batch_shards() == 8
      return PL.map_chunks(lambda a: ({"twice": 2 * a}, {"sum": jnp.sum(a)}), x, chunk=3)  # -> 2

  per_image, summed = jax.jit(f, in_shardings=batch)(jax.device_put(x, batch))
  np.testing.assert_array_equal(per_image["twice"], 2 * x)
  np.testing.assert_allclose(summed["sum"], jnp.sum(x))


@pytest.fixture(scope="module")
def pixel_setup():
  config = demo_model_config()
  model = DualToken(ml_collections.FrozenConfigDict(config.model))
  variables = init_variables(config.model, jax.random.key(0))
  images = jax.random.uniform(jax.random.key(7), (8, SIZE, SIZE, 3), minval=-1, maxval=1)
  zq = model.apply(variables, images, decode=False)["zq_pix"]
  lp_params = lpips_model.LPIPS().init(jax.random.key(3), images[:1], images[:1])["params"]
  disc = PatchDiscriminator(ndf=config.gan.ndf)
  disc_params = disc.init(jax.random.key(4), images[:1])["params"]
  return config, model, variables, images, zq, lpips_model.lpips_fn(lp_params), disc, disc_params


def _decode(model, variables, params):
  def decode(z):
    recon, sown = model.apply({**variables, "params": params}, z, train=True,
                              method=DualToken.decode, mutable=["intermediates"])
    return recon, sown["intermediates"]["decoder"]["conv_out_input"][0]
  return decode


@pytest.mark.parametrize("chunk", [0, 2])
def test_pixel_loss_equals_the_direct_formulation(pixel_setup, chunk):
  """Loss value and parameter gradients against differentiating MSE, LPIPS and λ·L_G directly,
  λ from the gradients of L_nll and L_G through the whole decoder (not via conv_out's input)."""
  config, model, variables, images, zq, lpips, disc, disc_params = pixel_setup
  loss_cfg, gan_cfg = config.loss, config.gan
  disc_fn = lambda r: disc.apply({"params": disc_params}, r)

  nll = lambda r: jnp.mean((r - images) ** 2) + loss_cfg.lpips * jnp.mean(lpips(r, images))
  g_fn = lambda r: -jnp.mean(disc_fn(r))

  @jax.jit
  def full_lambda(params, z):  # λ is a constant of the loss: computed once, outside its gradient
    def kernel_grad(loss_fn):  # ∇_W loss(decoder(z)), W = conv_out's kernel
      with_kernel = lambda k: {**params, "decoder": {**params["decoder"], "conv_out": {
          **params["decoder"]["conv_out"], "kernel": k}}}
      return jax.grad(lambda k: loss_fn(_decode(model, variables, with_kernel(k))(z)[0]))(
          params["decoder"]["conv_out"]["kernel"])
    return G.adaptive_gan_weight(kernel_grad(nll), kernel_grad(g_fn), gan_cfg.adaptive_min,
                                 gan_cfg.adaptive_max)

  lam = full_lambda(variables["params"], zq)

  def direct(params, z):
    recon, _ = _decode(model, variables, params)(z)
    return (loss_cfg.mse * jnp.mean((recon - images) ** 2) + loss_cfg.lpips * jnp.mean(lpips(recon, images))
            + gan_cfg.weight * lam * g_fn(recon)), lam

  def chunked(params, z):
    total, metrics, _ = PL.pixel_loss(
        _decode(model, variables, params), z, images, conv_out_params=params["decoder"]["conv_out"],
        lpips=lpips, disc_fn=disc_fn, loss_cfg=loss_cfg, gan_cfg=gan_cfg, chunk=chunk, remat=chunk > 0)
    return total, metrics["gan/adaptive_weight"]

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  (want, want_lam), want_grads = grad(direct)(variables["params"], zq)
  (got, got_lam), got_grads = grad(chunked)(variables["params"], zq)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_lam, want_lam, rtol=1e-5)
  # Absolute tolerance from the largest gradient: some are exactly 0 in exact arithmetic (e.g. the
  # decoder attention's key bias), i.e. pure rounding noise in both.
  scale = max(float(np.max(np.abs(y))) for y in jax.tree.leaves(want_grads))
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))
  assert float(np.max(np.abs(got_grads[1]))) > 0  # the latents (and so the encoder) get gradients


def test_discriminator_grads_in_chunks_equal_the_batch(pixel_setup):
  _, _, _, images, _, _, disc, disc_params = pixel_setup
  fake = images[::-1] * 0.5
  apply = lambda dp, x: disc.apply({"params": dp}, x)

  def direct(dp):
    real, f = apply(dp, images), apply(dp, fake)
    return G.discriminator_loss(real, f, weight=0.75), (jnp.mean(real), jnp.mean(f))

  (want, (want_real, want_fake)), want_grads = jax.value_and_grad(direct, has_aux=True)(disc_params)
  for chunk in (0, 2):
    loss, grads, real, f = jax.jit(lambda dp: PL.discriminator_grads(apply, dp, images, fake, 0.75, chunk))(disc_params)
    np.testing.assert_allclose([loss, real, f], [want, want_real, want_fake], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
