"""The convolution implementations (`models/conv.py`) equal `lax.conv_general_dilated`: values and
gradients w.r.t. input and kernel, on several shapes and paddings; the pixel decoder gives the
same outputs and gradients with each `conv_impl` and the same parameter tree; bad names fail
naming the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dualtoken_jax import config_files
from dualtoken_jax.models import config as mc
from dualtoken_jax.models import conv as C
from dualtoken_jax.models import pixel_decoder

GEMM_IMPLS = tuple(i for i in C.IMPLS if i != "xla")
DN = ("NHWC", "HWIO", "NHWC")
TOL = dict(rtol=1e-5, atol=1e-5)

# (B, H, W, Cin, Cout, kernel, padding): stride 1 throughout, odd sizes, batch 1, 1x1, 5x5,
# asymmetric and SAME/VALID string paddings.
CASES = [
    (2, 9, 7, 5, 6, 3, ((1, 1), (1, 1))),
    (1, 7, 5, 3, 4, 3, "SAME"),
    (1, 6, 6, 4, 4, 3, "VALID"),
    (2, 5, 8, 6, 3, 1, ((0, 0), (0, 0))),
    (1, 8, 7, 3, 5, 5, ((2, 2), (2, 2))),
    (2, 6, 5, 4, 3, 3, ((0, 2), (1, 0))),
]


def _arrays(b, h, w, cin, cout, k, seed=0):
  ks = jax.random.split(jax.random.key(seed), 2)
  return (jax.random.normal(ks[0], (b, h, w, cin), jnp.float32),
          jax.random.normal(ks[1], (k, k, cin, cout), jnp.float32) / (k * cin ** 0.5))


def _run(fn, x, w, padding):
  conv = lambda x, w: fn(x, w, (1, 1), padding, dimension_numbers=DN)
  y = conv(x, w)
  # A non-uniform cotangent, so every output position's gradient path is checked.
  cot = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
  dx, dw = jax.grad(lambda x, w: jnp.sum(conv(x, w) * cot), argnums=(0, 1))(x, w)
  return y, dx, dw


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}k{c[5]}")
def test_equal_to_lax_conv_values_and_gradients(case):
  *dims, padding = case
  x, w = _arrays(*dims)
  want = _run(lax.conv_general_dilated, x, w, padding)
  for impl in GEMM_IMPLS:
    got = jax.jit(lambda x, w, impl=impl: _run(C.conv_fn(impl), x, w, padding))(x, w)
    for name, g, r in zip(("output", "d/dinput", "d/dkernel"), got, want):
      assert g.shape == r.shape, (impl, name)
      np.testing.assert_allclose(g, r, **TOL, err_msg=f"{impl} {name}")


def test_a_wrong_kernel_gradient_would_be_caught():
  """The comparison is sharp: the kernel gradient of a conv with a transposed tap layout differs."""
  x, w = _arrays(1, 6, 6, 3, 3, 3)
  _, _, dw = _run(C.conv_fn("shifted"), x, w, "SAME")
  assert np.max(np.abs(dw - np.swapaxes(dw, 0, 1))) > 1e-2


def test_strided_and_grouped_convs_fall_back_to_lax():
  x, w = _arrays(2, 9, 9, 4, 6, 3)
  for impl in GEMM_IMPLS:
    fn = C.conv_fn(impl)
    got = fn(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN)
    want = lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN)
    np.testing.assert_allclose(got, want, **TOL)
    wg = w[:, :, :2]
    got = fn(x, wg, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2)
    want = lax.conv_general_dilated(x, wg, (1, 1), "SAME", dimension_numbers=DN,
                                    feature_group_count=2)
    np.testing.assert_allclose(got, want, **TOL)


def test_xla_is_lax_and_unknown_names_fail():
  assert GEMM_IMPLS == ("shifted", "gemm_dw")
  assert C.conv_fn("xla") is lax.conv_general_dilated
  with pytest.raises(config_files.ConfigError, match=r"model\.conv_impl must be one of"):
    C.conv_fn("cudnn")


def test_config_validation_names_the_field():
  config = mc.tokenizer_config(
      vision=mc.vit_config("Ti", 16), image_size=32, layer_recon=1, layer_sem=2,
      vq_pix=mc.quantizer_config(codebook_size=8, embed_dim=8, depth=1),
      vq_sem=mc.quantizer_config(codebook_size=8, embed_dim=8, depth=1, ema_update="pooled"),
      decoder=mc.decoder_config(ch=32, ch_mult=(1, 2), attn_resolutions=(), in_channels=32),
      decoder_latent_shape=(16, 16))
  mc.validate(config)
  config.conv_impl = "winograd"
  with pytest.raises(config_files.ConfigError, match="conv_impl must be one of"):
    mc.validate(config)


@pytest.fixture(scope="module")
def decoder_case():
  # One ResnetBlock per level: 3x3 convs, a 1x1 shortcut (64 -> 32), attention's 1x1 convs at
  # 4x4, an upsample conv.
  kwargs = dict(ch=32, ch_mult=(1, 2), num_res_blocks=0, attn_resolutions=(4,))
  z = jax.random.normal(jax.random.key(3), (1, 4, 4, 64), jnp.float32)
  params = jax.jit(pixel_decoder.Decoder(**kwargs).init)(jax.random.key(4), z)["params"]

  def run(impl, params):
    decoder = pixel_decoder.Decoder(**kwargs, conv_impl=impl)
    loss = lambda p, z: jnp.mean(jnp.square(decoder.apply({"params": p}, z)))
    out = decoder.apply({"params": params}, z)
    return out, jax.grad(loss, argnums=(0, 1))(params, z)

  return kwargs, z, params, jax.jit(run, static_argnums=0)


def test_pixel_decoder_same_params_outputs_and_gradients(decoder_case):
  kwargs, z, params, run = decoder_case
  want_out, (want_dp, want_dz) = run("xla", params)
  shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)
  for impl in GEMM_IMPLS:
    # The same parameter tree (names and shapes) as nn.Conv's under every implementation.
    tree = jax.eval_shape(lambda: pixel_decoder.Decoder(**kwargs, conv_impl=impl).init(
        jax.random.key(4), z))["params"]
    assert shapes(tree) == shapes(params)
    out, (dp, dz) = run(impl, params)
    np.testing.assert_allclose(out, want_out, **TOL, err_msg=impl)
    np.testing.assert_allclose(dz, want_dz, **TOL, err_msg=impl)
    flat, want_flat = jax.tree.leaves_with_path(dp), jax.tree.leaves(want_dp)
    for (path, g), r in zip(flat, want_flat):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{impl} {jax.tree_util.keystr(path)}")
