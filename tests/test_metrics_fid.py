"""FID maths: streaming statistics against numpy, the distance against closed forms."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from dualtoken_jax.metrics import fid


def _random_cov(rng, d, rank=None):
  a = rng.standard_normal((d, rank or d))
  return a @ a.T / (rank or d)


def _closed_form_commuting(mu1, a, mu2, b):
  """Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ: FID = ‖Δμ‖² + Σ (√a − √b)²."""
  return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


# ---------------------------------------------------------------- statistics
def test_streaming_equals_batch_statistics():
  rng = np.random.default_rng(0)
  feats = rng.gamma(2.0, 0.3, (1000, 64)).astype(np.float32)  # non-negative like pool3
  stats = fid.GaussianStats.zeros(64)
  for chunk in np.array_split(feats, [7, 300, 301, 999]):  # uneven, incl. a size-1 batch
    stats.update(chunk)
  assert stats.count == 1000
  np.testing.assert_allclose(stats.mean(), feats.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.covariance(), np.cov(feats.astype(np.float64), rowvar=False),
                             rtol=1e-10, atol=1e-13)
  assert np.array_equal(stats.covariance(), stats.covariance().T)
  assert stats.total.dtype == np.float64 and stats.outer.dtype == np.float64


def test_merge_across_shards_and_save_load_resume(tmp_path):
  rng = np.random.default_rng(1)
  feats = rng.standard_normal((500, 16)) + 3.0
  shards = [fid.GaussianStats.from_features(p) for p in np.array_split(feats, 4)]
  merged = fid.merge_all(shards)
  whole = fid.GaussianStats.from_features(feats)
  assert merged.count == 500
  np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=1e-11, atol=1e-13)
  # A killed run: save after half the data, load, continue.
  half = fid.GaussianStats.from_features(feats[:250])
  half.save(tmp_path / "sub" / "stats.npz")
  resumed = fid.GaussianStats.load(tmp_path / "sub" / "stats.npz").update(feats[250:])
  assert resumed.count == 500
  np.testing.assert_allclose(resumed.mean(), whole.mean(), rtol=1e-13)
  np.testing.assert_allclose(resumed.covariance(), whole.covariance(), rtol=1e-11, atol=1e-13)
  assert not list((tmp_path / "sub").glob("*.tmp"))


def test_allgather_single_process_is_exact():
  stats = fid.GaussianStats.from_features(np.random.default_rng(2).standard_normal((10, 5)))
  out = fid.allgather_stats(stats)
  assert out.count == stats.count
  assert np.array_equal(out.total, stats.total) and np.array_equal(out.outer, stats.outer)


def test_statistics_errors(tmp_path):
  stats = fid.GaussianStats.zeros(4)
  with pytest.raises(ValueError, match="dimension 3"):
    stats.update(np.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"\(N, d\)"):
    stats.update(np.zeros(4))
  with pytest.raises(ValueError, match="NaN"):
    stats.update(np.full((2, 4), np.nan))
  with pytest.raises(ValueError, match="at least 2"):
    stats.update(np.ones((1, 4))).covariance()
  with pytest.raises(ValueError, match="merge"):
    stats.merge(fid.GaussianStats.zeros(5))
  np.savez(tmp_path / "other.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="not a GaussianStats file"):
    fid.GaussianStats.load(tmp_path / "other.npz")


def test_load_mu_sigma_reads_both_formats(tmp_path):
  feats = np.random.default_rng(3).standard_normal((50, 6))
  stats = fid.GaussianStats.from_features(feats)
  stats.save(tmp_path / "ours.npz")
  np.savez(tmp_path / "pytorch_fid.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
  for name in ("ours.npz", "pytorch_fid.npz"):
    mu, sigma = fid.load_mu_sigma(tmp_path / name)
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-10)


# ---------------------------------------------------------------- distance
def test_identical_gaussians_give_zero():
  rng = np.random.default_rng(4)
  mu, sigma = rng.standard_normal(32), _random_cov(rng, 32)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_one_dimensional_closed_form():
  # W2² between N(m1, s1²) and N(m2, s2²) = (m1 − m2)² + (s1 − s2)².
  assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1, rel=1e-12)


def test_diagonal_covariances_closed_form():
  rng = np.random.default_rng(5)
  a, b = rng.uniform(0.1, 3, 20), rng.uniform(0.1, 3, 20)
  mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
  expected = _closed_form_commuting(mu1, a, mu2, b)
  value = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert value == pytest.approx(expected, rel=1e-10)


def test_commuting_covariances_closed_form():
  rng = np.random.default_rng(6)
  q = scipy.stats.ortho_group.rvs(24, random_state=7)
  a, b = rng.uniform(0.01, 2, 24), rng.uniform(0.01, 2, 24)
  s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  mu1, mu2 = rng.standard_normal(24), rng.standard_normal(24)
  expected = _closed_form_commuting(mu1, a, mu2, b)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_general_covariances_match_symmetric_form():
  # tr((Σ1Σ2)^½) = tr((Σ1^½ Σ2 Σ1^½)^½), the latter a PSD square root computed by eigh.
  rng = np.random.default_rng(8)
  s1, s2 = _random_cov(rng, 40), _random_cov(rng, 40)
  r1 = scipy.linalg.sqrtm(s1).real
  w = np.linalg.eigvalsh(r1 @ s2 @ r1)
  expected = np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(w, 0, None)))
  assert fid.frechet_distance(np.zeros(40), s1, np.zeros(40), s2) == pytest.approx(expected,
                                                                                    rel=1e-8)


def test_rank_deficient_covariances_from_few_samples():
  # N < d samples (as with < 2048 images): singular covariances, still a finite, correct FID.
  rng = np.random.default_rng(9)
  x, y = rng.standard_normal((20, 64)), rng.standard_normal((30, 64)) + 0.5
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  assert np.linalg.matrix_rank(s1) < 64
  value = fid.frechet_distance(x.mean(0), s1, y.mean(0), s2)
  ev = np.linalg.eigvals(s1 @ s2)
  expected = (np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.sum(np.sqrt(np.clip(ev.real, 0, None))))
  assert np.isfinite(value) and value == pytest.approx(expected, rel=1e-6)


def test_eps_offset_rescues_a_product_without_square_root():
  # A nilpotent product has no square root: sqrtm gives inf, the ε·I retry must take over.
  s1, s2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
  with np.errstate(all="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    assert not np.all(np.isfinite(scipy.linalg.sqrtm(s1 @ s2)))
  covmean = fid.sqrtm_product(s1, s2, eps=1e-6)
  assert np.all(np.isfinite(covmean))
  offset = (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2))
  np.testing.assert_allclose(covmean @ covmean, offset, atol=1e-9)
  assert np.isfinite(fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2))


def test_large_imaginary_component_is_an_error():
  with pytest.raises(ValueError, match="imaginary"):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, 1.0]), np.zeros(2), np.diag([-1.0, 1.0]))


def test_shape_and_value_errors():
  with pytest.raises(ValueError, match="covariances must have shape"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
  with pytest.raises(ValueError, match="means"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))
  with pytest.raises(ValueError, match="sigma2 contains NaN"):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))


def test_fid_from_sample_statistics_approaches_truth():
  rng = np.random.default_rng(10)
  a, b = np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.0, 2.0])
  x = rng.standard_normal((200_000, 3)) * np.sqrt(a)
  y = rng.standard_normal((200_000, 3)) * np.sqrt(b) + 1.0
  value = fid.fid_from_stats(fid.GaussianStats.from_features(x), fid.GaussianStats.from_features(y))
  assert value == pytest.approx(3 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), abs=0.03)
