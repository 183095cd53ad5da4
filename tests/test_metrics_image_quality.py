"""PSNR/SSIM in JAX against scikit-image on real photographs with common distortions."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import skimage.data
import skimage.metrics
from PIL import Image

from dualtoken_jax.data import images
from dualtoken_jax.metrics import image_quality as iq

PHOTOS = ("astronaut", "coffee", "chelsea")


def _photo(name):
  return (getattr(skimage.data, name)()[..., :3].astype(np.float64) / 255.0).astype(np.float32)


def _distortions(x):
  """Four distorted copies of x (float32, in [0, 1]): noise, blur, JPEG, brightness + clip."""
  rng = np.random.default_rng(0)
  noisy = np.clip(x + rng.normal(0, 0.08, x.shape), 0, 1)
  blurred = scipy.ndimage.gaussian_filter(x, sigma=(1.2, 1.2, 0))
  buf = io.BytesIO()
  Image.fromarray(np.round(x * 255).astype(np.uint8)).save(buf, format="JPEG", quality=25)
  jpeg = np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.float64) / 255.0
  bright = np.clip(x * 0.9 + 0.15, 0, 1)
  return np.stack([noisy, blurred, jpeg, bright]).astype(np.float32)


def _skimage_ssim(x, y, **kw):
  return skimage.metrics.structural_similarity(
      x.astype(np.float64), y.astype(np.float64), gaussian_weights=True, sigma=1.5,
      use_sample_covariance=False, data_range=1, **kw)


@pytest.mark.parametrize("name", PHOTOS)
def test_ssim_and_psnr_match_skimage_on_photos(name):
  x = _photo(name)
  ys = _distortions(x)
  xs = np.broadcast_to(x, ys.shape)
  ssim = np.asarray(iq.ssim(xs, ys))
  psnr = np.asarray(iq.psnr(xs, ys, eps=0.0))
  assert ssim.shape == psnr.shape == (4,)
  for i, y in enumerate(ys):
    ref_ssim = _skimage_ssim(x, y, channel_axis=-1)
    ref_psnr = skimage.metrics.peak_signal_noise_ratio(x.astype(np.float64), y.astype(np.float64),
                                                       data_range=1)
    assert abs(ssim[i] - ref_ssim) < 1e-4, (i, ssim[i], ref_ssim)
    assert abs(psnr[i] - ref_psnr) < 1e-4, (i, psnr[i], ref_psnr)
  # The distortions span a useful range, so agreement is not a coincidence of one regime.
  assert ssim.min() < 0.6 and ssim.max() > 0.8


def test_per_channel_and_unbatched_agree_with_skimage():
  x = _photo("chelsea")
  y = _distortions(x)[2]
  per_channel = np.asarray(iq.ssim(x, y, per_channel=True))
  assert per_channel.shape == (3,)
  for c in range(3):
    assert abs(per_channel[c] - _skimage_ssim(x[..., c], y[..., c])) < 1e-4
  assert float(iq.ssim(x, y)) == pytest.approx(per_channel.mean(), abs=1e-6)


def test_valid_border_definition():
  """A corrupted outermost column reaches the 'valid' map only through windows centred 5 pixels
  in; the value still equals skimage's (reflect-padded, then 5-pixel-cropped) mean."""
  x = _photo("coffee")[:64, :80]
  y = x.copy()
  y[:, 0] = 1.0 - y[:, 0]
  ref = _skimage_ssim(x, y, channel_axis=-1)
  assert float(iq.ssim(x, y)) == pytest.approx(ref, abs=1e-5)
  assert ref < 1.0


def test_gaussian_window_matches_skimage_and_pytorch_msssim_taps():
  w = iq.gaussian_window(11, 1.5)
  ref = np.exp(-(np.arange(-5, 6) ** 2) / (2 * 1.5 ** 2))
  np.testing.assert_allclose(w, ref / ref.sum(), rtol=1e-14)
  impulse = np.zeros(21)
  impulse[10] = 1
  np.testing.assert_allclose(scipy.ndimage.gaussian_filter1d(impulse, 1.5, truncate=3.5)[5:16], w,
                             rtol=1e-12)


def test_jit_and_identical_images():
  x = jnp.asarray(_photo("astronaut")[None, :128, :128])
  assert float(jax.jit(iq.ssim)(x, x)[0]) == pytest.approx(1.0, abs=1e-6)
  assert float(jax.jit(iq.psnr)(x, x)[0]) == pytest.approx(80.0, abs=1e-4)  # pyiqa's eps 1e-8
  assert np.isinf(float(iq.psnr(x, x, eps=0.0)[0]))


def test_psnr_definition_by_hand():
  x = np.zeros((2, 4, 4, 3), np.float32)
  y = x.copy()
  y[0] += 0.1          # MSE 0.01 -> 20 dB
  y[1, 0, 0, 0] = 0.5  # MSE 0.25 / 48
  np.testing.assert_allclose(iq.psnr(x, y, eps=0.0), [20.0, 10 * np.log10(48 / 0.25)], rtol=1e-5)


def test_to_unit_and_to_uint8_on_numpy_and_jax():
  y = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0], np.float32)
  np.testing.assert_allclose(images.to_unit(jnp.asarray(y)), [0, 0, 0.5, 0.75, 1, 1])
  np.testing.assert_allclose(images.to_unit(y), [0, 0, 0.5, 0.75, 1, 1])
  u8 = images.to_uint8(y)
  assert u8.dtype == np.uint8 and u8.tolist() == [0, 0, 128, 191, 255, 255]  # round half even
  np.testing.assert_array_equal(jax.jit(images.to_uint8)(y), u8)


def test_host_psnr_in_uint8_and_float_ranges():
  x = np.zeros((4, 4, 3), np.uint8)
  assert images.psnr(x, x) == float("inf")
  assert images.psnr(x, x + 255) == 0.0
  assert images.psnr(np.zeros(4), np.full(4, 0.2), data_range=2.0) == pytest.approx(20.0)


def test_clear_errors():
  x = np.zeros((1, 16, 16, 3), np.float32)
  with pytest.raises(ValueError, match="same shape"):
    iq.ssim(x, x[:, :15])
  with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
    iq.psnr(x[0, 0], x[0, 0])
  with pytest.raises(ValueError, match="uint8"):
    iq.psnr(x.astype(np.uint8), x.astype(np.uint8))
  with pytest.raises(ValueError, match=r"\[0, 1\].*to_unit"):
    iq.psnr(x - 0.5, x)
  with pytest.raises(ValueError, match="11x11"):
    iq.ssim(x[:, :10], x[:, :10])
  with pytest.raises(ValueError, match="NaN"):
    iq.ssim(np.full_like(x, np.nan), x)
  assert np.isfinite(float(iq.psnr(x - 0.5, x, validate=False)[0]))
