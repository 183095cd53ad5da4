"""Spec A.2 geometry: RandomResizedCrop statistics and fallback, eval resize + centre crop."""

import math

import numpy as np
import pytest
from PIL import Image

from dualtoken_jax.data import records
from dualtoken_jax.data import transforms


def _noise(height, width, seed=0):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))


@pytest.mark.parametrize("size", [(300, 400), (400, 300), (97, 1000), (64, 64)])
def test_train_output_shape_dtype_and_range(size):
  # Black left half, white right half: any crop of >= 90 % of the area shows both.
  arr = np.zeros(size + (3,), np.uint8)
  arr[:, size[1] // 2:] = 255
  stage = transforms.TrainPreprocess(48)
  out = stage.random_map({"key": "k", "image": Image.fromarray(arr)}, np.random.default_rng(0))
  assert out["key"] == "k"
  assert out["image"].shape == (48, 48, 3) and out["image"].dtype == np.float32
  assert out["image"].min() >= -1.0 and out["image"].max() <= 1.0
  assert out["image"][:, 0].max() < -0.99 and out["image"][:, -1].min() > 0.99


def test_to_float_maps_uint8_endpoints_to_minus_one_and_one():
  img = Image.fromarray(np.array([[[0, 255, 51]]], np.uint8))
  np.testing.assert_allclose(transforms.to_float(img), [[[-1.0, 1.0, 51 / 127.5 - 1]]],
                             rtol=0, atol=1e-6)


def _boxes(height, width, n, **kw):
  rng = np.random.default_rng(0)
  boxes = np.array([transforms.random_resized_crop_box(height, width, rng, **kw)
                    for _ in range(n)])
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  return top, left, h, w


@pytest.mark.parametrize("height,width", [(1000, 1000), (360, 400)])
def test_random_resized_crop_statistics_with_the_spec_ranges(height, width):
  top, left, h, w = _boxes(height, width, 2000)
  area = h * w / (height * width)
  log_aspect = np.log(w / h)
  # Rounding the sides to integers moves the area fraction by well under 1 %.
  assert area.min() >= 0.9 * 0.99 and area.max() <= 1.0
  assert area.min() < 0.905 and area.max() > 0.99  # The whole scale range is used.
  # With >= 90 % of the area, a box that fits has w >= 0.9 W and h >= 0.9 H, which bounds
  # the aspect ratio more tightly than (3/4, 4/3) does.
  lo = max(math.log(3 / 4), math.log(0.9 * width / height))
  hi = min(math.log(4 / 3), math.log(width / (0.9 * height)))
  assert log_aspect.min() >= lo - 0.01 and log_aspect.max() <= hi + 0.01
  assert log_aspect.min() < lo + 0.03 and log_aspect.max() > hi - 0.03
  assert len(set(top.tolist())) > 5 and len(set(left.tolist())) > 5  # Positions vary too.


def test_random_resized_crop_samples_log_ratio_uniformly():
  # torchvision's default scale (0.08, 1) on a large square: most first attempts fit, so the
  # log aspect ratio is close to uniform on [log 3/4, log 4/3].
  _, _, h, w = _boxes(1000, 1000, 4000, scale=(0.08, 1.0))
  log_aspect = np.log(w / h)
  bound = math.log(4 / 3)
  np.testing.assert_allclose(np.quantile(log_aspect, [0.25, 0.5, 0.75]),
                             [-bound / 2, 0.0, bound / 2], atol=0.02)
  area = h * w / 1e6
  assert area.min() < 0.1 and area.max() > 0.95


def test_random_resized_crop_is_deterministic_per_generator():
  img = _noise(100, 100)
  a = transforms.random_resized_crop(img, 32, np.random.default_rng(7))
  b = transforms.random_resized_crop(img, 32, np.random.default_rng(7))
  c = transforms.random_resized_crop(img, 32, np.random.default_rng(8))
  assert np.array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_random_resized_crop_falls_back_to_a_centre_crop_like_torchvision():
  # A 10:1 panorama: no box with ratio <= 4/3 and >= 90 % of the area fits, so all ten
  # attempts fail and torchvision centre-crops the full height at the widest allowed ratio.
  rng = np.random.default_rng(0)
  assert transforms.random_resized_crop_box(100, 1000, rng) == (0, (1000 - 133) // 2, 100, 133)
  assert transforms.random_resized_crop_box(1000, 100, rng) == ((1000 - 133) // 2, 0, 133, 100)
  # In-range aspect but an impossible scale: the whole image.
  assert transforms.random_resized_crop_box(50, 60, rng, scale=(1.5, 2.0)) == (0, 0, 50, 60)


def test_eval_resize_follows_torchvision_rounding():
  assert transforms.shorter_side_size(333, 500, 224) == (224, 336)  # int() truncation.
  assert transforms.shorter_side_size(500, 333, 224) == (336, 224)
  assert transforms.shorter_side_size(384, 384, 384) == (384, 384)
  assert transforms.center_crop_box(224, 336, 224) == (0, 56)
  assert transforms.center_crop_box(225, 224, 224) == (0, 0)  # round(0.5) == 0, as in Python.
  assert transforms.center_crop_box(227, 224, 224) == (2, 0)  # round(1.5) == 2.


@pytest.mark.parametrize("landscape", [True, False])
def test_eval_centre_crop_geometry_on_an_asymmetric_image(landscape):
  # A linear ramp along the long side: after shorter-side resize (200 -> 100, so x2
  # downscaling) and centre crop, output column j must show the ramp at source coordinate
  # 2 * (25 + j + 0.5) - 0.5, i.e. the middle 200 of the 300 source pixels.
  long_side, short_side, res = 300, 200, 100
  ramp = np.linspace(0, 255, long_side)
  if landscape:
    arr = np.broadcast_to(ramp[None, :, None], (short_side, long_side, 3))
  else:
    arr = np.broadcast_to(ramp[:, None, None], (long_side, short_side, 3))
  img = Image.fromarray(np.rint(arr).astype(np.uint8))
  out = transforms.EvalPreprocess(res).map({"key": "r", "image": img})["image"]
  assert out.shape == (res, res, 3)
  along, across = ((0, 2), (1, 2)) if landscape else ((1, 2), (0, 2))
  profile = (out.mean(axis=along) + 1) * 127.5
  source_x = 2 * (25 + np.arange(res) + 0.5) - 0.5
  np.testing.assert_allclose(profile, np.interp(source_x, np.arange(long_side), ramp), atol=1.0)
  assert np.ptp(out.mean(axis=across)) < 1e-5  # Nothing varies across the ramp.


def test_eval_is_identity_on_an_image_already_at_resolution():
  img = _noise(32, 32)
  out = transforms.EvalPreprocess(32).map({"key": "s", "image": img})["image"]
  np.testing.assert_allclose(out, transforms.to_float(img))


def test_skip_records_pass_through_and_bad_arguments_are_rejected():
  skip = records.skip_record("empty", "k")
  assert transforms.TrainPreprocess(8).random_map(skip, np.random.default_rng(0)) is skip
  assert transforms.EvalPreprocess(8).map(skip) is skip
  with pytest.raises(ValueError, match="resolution"):
    transforms.EvalPreprocess(0)
  with pytest.raises(ValueError, match="scale"):
    transforms.TrainPreprocess(8, scale=(0.5, 1.5))


def test_train_crop_is_crop_then_resize_as_in_torchvision():
  # Resizing with PIL's `box=` would filter across the crop border; torchvision crops first.
  img = _noise(90, 120)
  out = transforms.random_resized_crop(img, 40, np.random.default_rng(3))
  top, left, h, w = transforms.random_resized_crop_box(90, 120, np.random.default_rng(3))
  expected = img.crop((left, top, left + w, top + h)).resize((40, 40), Image.BICUBIC)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
  assert (h, w) != (90, 120)  # A proper sub-box, where the two methods differ:
  boxed = img.resize((40, 40), Image.BICUBIC, box=(left, top, left + w, top + h))
  assert not np.array_equal(np.asarray(out), np.asarray(boxed))


def test_load_image_for_inference(tmp_path):
  from dualtoken_jax import data
  from dualtoken_jax.data import sample_photos
  path = sample_photos.sample_photo_paths()["skimage/astronaut.png"]
  out = data.load_image(path, 64)
  assert out.shape == (64, 64, 3) and out.dtype == np.float32
  with open(path, "rb") as f:
    np.testing.assert_array_equal(data.load_image(f.read(), 64), out)
  # Same geometry as the eval pipeline stage.
  img = Image.open(path).convert("RGB")
  np.testing.assert_array_equal(transforms.EvalPreprocess(64).map({"key": "", "image": img})[
      "image"], out)
  (tmp_path / "empty.png").write_bytes(b"")
  with pytest.raises(ValueError, match="zero-byte"):
    data.load_image(tmp_path / "empty.png", 64)
