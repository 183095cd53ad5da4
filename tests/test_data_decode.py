"""Decoding: every PIL mode to 8-bit RGB, and bad bytes reported with a reason, never raised."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dualtoken_jax.data import decode
from dualtoken_jax.data import records


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def _rgb(img_or_bytes, **kw) -> np.ndarray:
  if isinstance(img_or_bytes, bytes):
    out = decode.decode_image(img_or_bytes, **kw)
  else:
    out = decode.to_rgb(img_or_bytes, **kw)
  assert out.mode == "RGB"
  arr = np.asarray(out)
  assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 3
  return arr


def _png16_rgb(arr: np.ndarray) -> bytes:
  """A 48-bit RGB PNG (PIL cannot write one), written chunk by chunk."""
  h, w, _ = arr.shape
  raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
  chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_rgb_and_grayscale_modes():
  rgb = np.array([[[10, 20, 30], [200, 100, 0]]], np.uint8)
  np.testing.assert_array_equal(_rgb(_encode(Image.fromarray(rgb), "PNG")), rgb)
  gray = np.array([[0, 77, 255]], np.uint8)
  np.testing.assert_array_equal(_rgb(_encode(Image.fromarray(gray, "L"), "PNG")),
                                np.repeat(gray[..., None], 3, -1))
  bilevel = Image.fromarray(np.array([[0, 255]], np.uint8), "L").convert("1")
  assert bilevel.mode == "1"
  np.testing.assert_array_equal(_rgb(_encode(bilevel, "PNG"))[0, :, 0], [0, 255])


def test_alpha_modes_composite_on_white_or_drop():
  # Pixels: opaque, fully transparent, half transparent.
  rgba = np.array([[[200, 0, 0, 255], [0, 0, 0, 0], [0, 100, 0, 128]]], np.uint8)
  data = _encode(Image.fromarray(rgba, "RGBA"), "PNG")
  white = _rgb(data)
  np.testing.assert_array_equal(white[0, 0], [200, 0, 0])
  np.testing.assert_array_equal(white[0, 1], [255, 255, 255])
  expected_half = np.rint(np.array([0, 100, 0]) * 128 / 255 + 255 * 127 / 255)
  np.testing.assert_allclose(white[0, 2], expected_half, atol=1)
  np.testing.assert_array_equal(_rgb(data, alpha="drop"), rgba[..., :3])

  la = np.array([[[100, 255], [100, 0]]], np.uint8)
  out = _rgb(_encode(Image.fromarray(la, "LA"), "PNG"))
  np.testing.assert_array_equal(out[0], [[100] * 3, [255] * 3])

  pa = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
  pa.putpalette([255, 0, 0, 0, 0, 255])
  pa = pa.convert("PA")
  pa.putalpha(Image.fromarray(np.array([[255, 0]], np.uint8), "L"))
  assert pa.mode == "PA"
  np.testing.assert_array_equal(_rgb(pa)[0], [[255, 0, 0], [255, 255, 255]])

  premultiplied = Image.fromarray(rgba, "RGBA").convert("RGBa")
  np.testing.assert_array_equal(_rgb(premultiplied)[0, :2], [[200, 0, 0], [255, 255, 255]])
  la_pre = Image.frombytes("La", (2, 1), bytes([50, 128, 0, 0]))  # lum 100 at alpha 128.
  out = _rgb(la_pre)
  np.testing.assert_allclose(out[0, 0], [100 * 128 / 255 + 255 * 127 / 255] * 3, atol=1.5)
  np.testing.assert_array_equal(out[0, 1], [255] * 3)


def test_palette_with_and_without_transparency():
  pal = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
  pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
  np.testing.assert_array_equal(_rgb(_encode(pal, "PNG"))[0],
                                [[255, 0, 0], [0, 255, 0], [0, 0, 255]])
  np.testing.assert_array_equal(_rgb(_encode(pal, "GIF"))[0],
                                [[255, 0, 0], [0, 255, 0], [0, 0, 255]])
  data = _encode(pal, "PNG", transparency=1)  # Index 1 (green) is transparent.
  assert "transparency" in Image.open(io.BytesIO(data)).info
  np.testing.assert_array_equal(_rgb(data)[0], [[255, 0, 0], [255, 255, 255], [0, 0, 255]])
  np.testing.assert_array_equal(_rgb(data, alpha="drop")[0],
                                [[255, 0, 0], [0, 255, 0], [0, 0, 255]])


def test_cmyk_ycbcr_lab_hsv():
  cmyk = Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0, 0, 0, 0, 255]))
  expected = [[255, 255, 255], [0, 255, 255], [0, 0, 0]]
  np.testing.assert_array_equal(_rgb(_encode(cmyk, "TIFF"))[0], expected)
  jpeg = _rgb(_encode(cmyk.resize((24, 8), Image.NEAREST), "JPEG", quality=95))
  np.testing.assert_allclose(jpeg[4, [2, 10, 21]], expected, atol=12)  # Block interiors.
  rgb = Image.fromarray(np.array([[[250, 10, 10], [10, 10, 250]]], np.uint8))
  # Round trips through 8-bit colour spaces; LAB's quantisation is the coarsest.
  for mode, atol in (("YCbCr", 4), ("HSV", 4), ("LAB", 24)):
    np.testing.assert_allclose(_rgb(rgb.convert(mode)), np.asarray(rgb), atol=atol, err_msg=mode)


def test_sixteen_bit_modes_rescale_instead_of_clipping():
  values = np.array([[0, 128, 257 * 100, 65535]], np.uint16)
  expected = np.array([0, 0, 100, 255])
  png = _encode(Image.fromarray(values), "PNG")
  assert Image.open(io.BytesIO(png)).mode == "I;16"
  np.testing.assert_array_equal(_rgb(png)[0, :, 1], expected)
  big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
  np.testing.assert_array_equal(_rgb(big_endian)[0, :, 0], expected)
  # 16-bit-per-channel RGB: PIL reduces it to 8 bits on open.
  rgb48 = np.zeros((2, 2, 3), np.uint16)
  rgb48[0, 0] = [65535, 257 * 128, 0]
  np.testing.assert_array_equal(_rgb(_png16_rgb(rgb48))[0, 0], [255, 128, 0])


def test_int32_and_float_modes():
  small = Image.fromarray(np.array([[0, 7, 255]], np.int32), "I")
  np.testing.assert_array_equal(_rgb(_encode(small, "TIFF"))[0, :, 0], [0, 7, 255])
  wide = Image.fromarray(np.array([[-5, 257 * 3, 65535, 100000]], np.int32), "I")
  np.testing.assert_array_equal(_rgb(wide)[0, :, 0], [0, 3, 255, 255])
  unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32), "F")
  np.testing.assert_array_equal(_rgb(_encode(unit, "TIFF"))[0, :, 0], [0, 128, 255, 0])
  byte_range = Image.fromarray(np.array([[-3.0, 17.4, 300.0]], np.float32), "F")
  np.testing.assert_array_equal(_rgb(byte_range)[0, :, 0], [0, 17, 255])


def test_decoded_arrays_as_tfds_returns_them():
  hwc = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  np.testing.assert_array_equal(np.asarray(decode.array_to_rgb(hwc)), hwc)
  np.testing.assert_array_equal(np.asarray(decode.array_to_rgb(hwc[..., :1]))[..., 2],
                                hwc[..., 0])
  np.testing.assert_array_equal(np.asarray(decode.array_to_rgb(hwc[..., 0])),
                                np.repeat(hwc[..., :1], 3, -1))
  assert np.asarray(decode.array_to_rgb(np.array([[True, False]]))).tolist() == [
      [[255] * 3, [0] * 3]]
  rgb16 = np.array([[[65535, 257 * 100, 0]]], np.uint16)
  np.testing.assert_array_equal(np.asarray(decode.array_to_rgb(rgb16)), [[[255, 100, 0]]])
  unit = np.array([[[1.0, 0.5, np.nan]]], np.float32)
  np.testing.assert_array_equal(np.asarray(decode.array_to_rgb(unit)), [[[255, 128, 0]]])
  rgba = np.zeros((1, 1, 4), np.uint8)
  np.testing.assert_array_equal(np.asarray(decode.array_to_rgb(rgba)), [[[255, 255, 255]]])
  with pytest.raises(decode.SkipImage) as e:
    decode.array_to_rgb(np.zeros((2, 2, 7), np.uint8))
  assert e.value.reason == "decode_error"


@pytest.fixture(scope="module")
def jpeg_bytes():
  rng = np.random.default_rng(0)
  return _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")


def test_bad_bytes_give_reasons(jpeg_bytes, monkeypatch):
  cases = {
      "empty": b"",
      "decode_error": np.random.default_rng(1).bytes(2000),
  }
  for reason, data in cases.items():
    with pytest.raises(decode.SkipImage) as e:
      decode.decode_image(data)
    assert e.value.reason == reason
  with pytest.raises(decode.SkipImage) as e:
    decode.decode_image(jpeg_bytes[:len(jpeg_bytes) // 2])  # Truncated.
  assert e.value.reason == "decode_error"
  with pytest.raises(decode.SkipImage) as e:
    decode.decode_image(jpeg_bytes, max_pixels=64 * 64 - 1)
  assert e.value.reason == "too_large"
  # PIL's own global bomb limit stays in force and is reported the same way.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  with pytest.raises(decode.SkipImage) as e:
    decode.decode_image(jpeg_bytes)
  assert e.value.reason == "too_large"


def test_decode_stage_turns_failures_into_skip_records(jpeg_bytes):
  stage = decode.DecodeImage()
  good = stage.map({"key": "a", "image_bytes": jpeg_bytes})
  assert good["key"] == "a" and good["image"].mode == "RGB" and good["image"].size == (64, 64)
  bad = stage.map({"key": "b", "image_bytes": b"not an image"})
  assert records.is_skipped(bad) and bad["skip"] == "decode_error" and bad["key"] == "b"
  passthrough = records.skip_record("missing", "c", "gone")
  assert stage.map(passthrough) is passthrough
  arr = stage.map({"key": "d", "image": np.zeros((3, 5), np.uint8)})
  assert arr["image"].size == (5, 3)
  with pytest.raises(KeyError, match="image_bytes"):
    stage.map({"key": "e", "pixels": b""})
  with pytest.raises(ValueError, match="alpha"):
    decode.DecodeImage(alpha="black")
  with pytest.raises(ValueError, match="alpha") as e:
    decode.decode_image(b"x", alpha="black")
  assert not isinstance(e.value, decode.SkipImage)  # A caller's bug, not a bad image.
