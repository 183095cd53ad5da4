"""Codebook usage statistics against hand-computed values; histogram accumulation and PNGs."""

import functools
import math

import jax
import numpy as np
import pytest
from PIL import Image

from dualtoken_jax.metrics import codebook_stats as cs


def test_hand_computed_levels():
  counts = np.array([[2, 2, 0, 0],      # two codes, equally used
                     [1, 1, 1, 1],      # uniform
                     [0, 0, 5, 0],      # a single code
                     [1, 1, 2, 0]])     # p = (1/4, 1/4, 1/2, 0)
  s = cs.usage_stats(counts)
  np.testing.assert_array_equal(s["num_tokens"], [4, 4, 5, 4])
  np.testing.assert_array_equal(s["codes_used"], [2, 4, 1, 3])
  np.testing.assert_array_equal(s["dead_codes"], [2, 0, 3, 1])
  np.testing.assert_allclose(s["usage_fraction"], [0.5, 1.0, 0.25, 0.75])
  np.testing.assert_allclose(s["entropy_bits"], [1.0, 2.0, 0.0, 1.5], atol=1e-15)
  np.testing.assert_allclose(s["normalized_entropy"], [0.5, 1.0, 0.0, 0.75], atol=1e-15)
  np.testing.assert_allclose(s["perplexity"], [2.0, 4.0, 1.0, 2 ** 1.5], rtol=1e-14)
  np.testing.assert_allclose(s["kl_to_uniform_nats"],
                             [math.log(2), 0.0, math.log(4), 0.5 * math.log(2)], atol=1e-15)
  assert set(s) == set(cs.STAT_NAMES)


def test_pooled_row_and_empty_level():
  counts = np.array([[3, 0, 0], [0, 0, 0]])
  s = cs.usage_stats(counts, pooled=True)
  assert s["codes_used"].shape == (3,)
  assert np.isnan(s["entropy_bits"][1]) and s["num_tokens"][1] == 0
  np.testing.assert_array_equal(s["codes_used"], [1, 0, 1])   # last row: both levels together
  flat = cs.stats_for_logging(s, "pixel", pooled=True)
  assert flat["pixel/level_0/codes_used"] == 1.0 and flat["pixel/all/num_tokens"] == 3.0


def test_streaming_histogram_merge_save_load(tmp_path):
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 64, size=(6, 5, 5, 4))          # (B, h, w, D)
  expected = np.zeros((4, 64), np.int64)
  for d in range(4):
    for c in codes[..., d].ravel():
      expected[d, c] += 1
  np.testing.assert_array_equal(cs.histogram(codes, 64), expected)
  shards = [cs.CodeHistogram.zeros(4, 64).update(part) for part in np.array_split(codes, 3)]
  merged = functools.reduce(cs.CodeHistogram.merge, shards)
  assert merged.counts.dtype == np.int64
  np.testing.assert_array_equal(merged.counts, expected)
  merged.save(tmp_path / "hist.npz")
  loaded = cs.CodeHistogram.load(tmp_path / "hist.npz")
  np.testing.assert_array_equal(loaded.counts, expected)
  np.testing.assert_allclose(loaded.stats()["entropy_bits"],
                             cs.usage_stats(expected)["entropy_bits"])


def test_device_histogram_matches_host():
  codes = np.random.default_rng(1).integers(0, 100, size=(3, 7, 7, 8)).astype(np.int32)
  dev = jax.jit(cs.histogram_jax, static_argnums=1)(codes, 100)
  np.testing.assert_array_equal(np.asarray(dev), cs.histogram(codes, 100))
  h = cs.CodeHistogram.zeros(8, 100).add_counts(dev).add_counts(np.asarray(dev))
  np.testing.assert_array_equal(h.counts, 2 * cs.histogram(codes, 100))


def test_clear_errors(tmp_path):
  h = cs.CodeHistogram.zeros(2, 10)
  with pytest.raises(ValueError, match=r"\[0, 10\)"):
    h.update(np.array([[0, 10]]))
  with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
    h.update(np.zeros((4, 3), np.int32))
  with pytest.raises(ValueError, match="integers"):
    h.update(np.zeros((4, 2), np.float32))
  with pytest.raises(ValueError, match="merge"):
    h.merge(cs.CodeHistogram.zeros(3, 10))
  with pytest.raises(ValueError, match="non-negative"):
    cs.usage_stats(np.array([[1, -1]]))
  np.savez(tmp_path / "x.npz", counts=np.zeros((2, 10), np.int64))
  with pytest.raises(ValueError, match="not a CodeHistogram file"):
    cs.CodeHistogram.load(tmp_path / "x.npz")


def test_histogram_pngs(tmp_path):
  rng = np.random.default_rng(2)
  pixel = cs.CodeHistogram.zeros(3, 512).update(rng.integers(0, 300, size=(1000, 3)))
  semantic = np.stack([rng.poisson(5.0, 512) for _ in range(2)]).astype(np.int64)
  paths = cs.write_histogram_pngs({"pixel": pixel, "semantic": semantic}, tmp_path / "plots")
  assert sorted(paths) == ["pixel", "semantic"]
  for name, path in paths.items():
    assert path.name == f"codebook_{name}.png"
    with Image.open(path) as im:
      assert im.format == "PNG"
      pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 1.0   # something was drawn
  with Image.open(paths["pixel"]) as a, Image.open(paths["semantic"]) as b:
    assert a.size[1] > b.size[1]  # one row of panels per level: 3 levels vs 2
