"""Fréchet Inception Distance: streaming Gaussian feature statistics and the distance itself.

Definitions (as in pytorch-fid and clean-fid, so numbers are comparable):

* Statistics of N feature vectors x_i ∈ R^d: mean μ = (1/N) Σ x_i and the *unbiased* covariance
  Σ = (Σ x_i x_iᵀ − N μ μᵀ) / (N − 1), i.e. `np.cov(features, rowvar=False)`.
* FID(μ1, Σ1, μ2, Σ2) = ‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^{1/2}).

`GaussianStats` accumulates the sufficient statistics (count, Σ x, Σ x xᵀ) in float64 on the
host, one batch at a time, so 50 000 Inception features are never held at once. Accumulators
add: shards and hosts merge with `merge` / `merge_all` / `allgather_stats`, and `save`/`load`
write them to an `.npz` so a killed evaluation resumes from the last saved batch. In float64
the raw-moment form loses nothing measurable for Inception pool3 features (non-negative, mean
and spread of the same order): the cancellation in Σ x xᵀ − N μ μᵀ costs about
log10(‖μ‖²/λ_min) of float64's ~16 digits.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Iterable

import numpy as np
import scipy.linalg

from dualtoken_jax.bridges import tensor_files

_FORMAT = "dualtoken_jax.gaussian_stats.v1"


@dataclasses.dataclass
class GaussianStats:
  """Streaming sufficient statistics of d-dimensional features, in float64.

  Attributes:
    count: number of feature vectors seen.
    total: (d,) float64, Σ x_i.
    outer: (d, d) float64, Σ x_i x_iᵀ.
  """
  count: int
  total: np.ndarray
  outer: np.ndarray

  @classmethod
  def zeros(cls, dim: int) -> "GaussianStats":
    """An empty accumulator for `dim`-dimensional features (2048 for Inception pool3)."""
    if dim <= 0:
      raise ValueError(f"feature dimension must be positive, got {dim}")
    return cls(0, np.zeros((dim,), np.float64), np.zeros((dim, dim), np.float64))

  @classmethod
  def from_features(cls, features) -> "GaussianStats":
    """Statistics of one (N, d) array of features (any float dtype, numpy or jax)."""
    x = _as_features(features)
    stats = cls.zeros(x.shape[1])
    stats.update(x)
    return stats

  @property
  def dim(self) -> int:
    return self.total.shape[0]

  def update(self, features) -> "GaussianStats":
    """Adds a batch of features, shape (N, d); converted to float64 before summing. Returns self.

    Pass host-local data (numpy, or a fully addressable jax array); on several hosts each one
    accumulates its own shard and `allgather_stats` / `merge_all` combine them.
    """
    x = _as_features(features)
    if x.shape[1] != self.dim:
      raise ValueError(f"features have dimension {x.shape[1]}, the accumulator has {self.dim}")
    self.count += x.shape[0]
    self.total += x.sum(axis=0)
    self.outer += x.T @ x
    return self

  def merge(self, other: "GaussianStats") -> "GaussianStats":
    """A new accumulator holding the statistics of both inputs' features together."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
    return GaussianStats(self.count + other.count, self.total + other.total,
                         self.outer + other.outer)

  def mean(self) -> np.ndarray:
    """μ = Σ x / N, float64 (d,)."""
    if self.count < 1:
      raise ValueError("the mean needs at least 1 feature vector; the accumulator is empty")
    return self.total / self.count

  def covariance(self) -> np.ndarray:
    """Unbiased covariance (Σ x xᵀ − N μ μᵀ)/(N − 1), float64 (d, d), exactly symmetric."""
    if self.count < 2:
      raise ValueError(f"the covariance needs at least 2 feature vectors, got {self.count}")
    mu = self.mean()
    cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return (cov + cov.T) / 2

  def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
    return self.mean(), self.covariance()

  def save(self, path: str | os.PathLike) -> None:
    """Writes an `.npz` (count, total, outer); written to a temporary name, then renamed."""
    tensor_files.write_npz(path, {"format": np.array(_FORMAT), "count": np.array(self.count, np.int64),
                                  "total": self.total, "outer": self.outer})

  @classmethod
  def load(cls, path: str | os.PathLike) -> "GaussianStats":
    """Reads a file written by `save`."""
    f = tensor_files.read_tagged_npz(path, _FORMAT, "a GaussianStats file",
                                     "; for pytorch-fid style mu/sigma files use load_mu_sigma")
    stats = cls(int(f["count"]), np.asarray(f["total"], np.float64),
                np.asarray(f["outer"], np.float64))
    d = stats.total.shape
    if len(d) != 1 or stats.outer.shape != d * 2:
      raise ValueError(f"{path}: inconsistent shapes total {stats.total.shape}, "
                       f"outer {stats.outer.shape}")
    return stats


def _as_features(features) -> np.ndarray:
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"features must have shape (N, d), got {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("features contain NaN or inf")
  return x


def merge_all(stats: Iterable[GaussianStats]) -> GaussianStats:
  """Sum of several accumulators (e.g. one file per host or per shard)."""
  stats = list(stats)
  if not stats:
    raise ValueError("merge_all needs at least one GaussianStats")
  out = stats[0]
  for s in stats[1:]:
    out = out.merge(s)
  return out


def allgather_stats(stats: GaussianStats) -> GaussianStats:
  """Merges every JAX process's accumulator; each process gets the total.

  The float64 arrays travel as their raw bits (viewed as uint32), so the gather is exact even
  though JAX itself runs without x64. Every process must call this (a collective).
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  as_u32 = lambda a: np.ascontiguousarray(a, np.float64).view(np.uint32)
  tree = {"count": np.array([stats.count], np.int32), "total": as_u32(stats.total),
          "outer": as_u32(stats.outer)}
  if stats.count >= 2**31:
    raise ValueError(f"count {stats.count} does not fit the int32 gather")
  gathered = multihost_utils.process_allgather(tree, tiled=False)
  parts = [GaussianStats(int(np.asarray(gathered["count"])[i, 0]),
                         np.asarray(gathered["total"])[i].view(np.float64).copy(),
                         np.asarray(gathered["outer"])[i].view(np.float64).copy())
           for i in range(np.asarray(gathered["count"]).shape[0])]
  return merge_all(parts)


def load_mu_sigma(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """(μ, Σ) from a `GaussianStats` file or a pytorch-fid/clean-fid `.npz` with `mu`, `sigma`."""
  with np.load(path, allow_pickle=False) as f:
    if "mu" in f.files and "sigma" in f.files:
      return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
  return GaussianStats.load(path).mu_sigma()


def sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6,
                  residual_tol: float = 1e-3) -> np.ndarray:
  """(Σ1 Σ2)^{1/2} by `scipy.linalg.sqrtm`, the pytorch-fid / clean-fid recipe.

  If the result is not finite (Σ1 Σ2 singular or numerically defective), or its square is far
  from the product (relative Frobenius residual > `residual_tol`, the silent form of the same
  failure), it is recomputed as ((Σ1 + εI)(Σ2 + εI))^{1/2}. pytorch-fid retries only on
  non-finite output; for real feature statistics both triggers agree. Any imaginary part is
  returned as is; `frechet_distance` decides whether it is negligible.

  Raises:
    ValueError: the square root is still not finite after the ε offset.
  """
  def root(a, b):
    prod = a @ b
    with np.errstate(all="ignore"), warnings.catch_warnings():
      warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # judged by the residual below
      s = scipy.linalg.sqrtm(prod)
      ok = np.all(np.isfinite(s))
      if ok:
        scale = np.linalg.norm(prod)
        ok = np.linalg.norm(s @ s - prod) <= residual_tol * max(scale, np.finfo(np.float64).tiny)
    return s, bool(ok)

  covmean, ok = root(sigma1, sigma2)
  if not ok:
    offset = np.eye(sigma1.shape[0]) * eps
    covmean, ok = root(sigma1 + offset, sigma2 + offset)
    if not np.all(np.isfinite(covmean)):
      raise ValueError(f"sqrtm(sigma1 @ sigma2) is not finite even with {eps}*I added to the "
                       "diagonals")
  return covmean


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6,
                     imag_atol: float = 1e-3) -> float:
  """FID between N(μ1, Σ1) and N(μ2, Σ2): ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}).

  Computed in float64. The matrix square root follows pytorch-fid: `scipy.linalg.sqrtm`, with
  ε·I added to both covariances when the product is singular (see `sqrtm_product`); a complex
  result whose diagonal has imaginary parts within `imag_atol` of 0 keeps its real part.

  Args:
    mu1, mu2: (d,) means.
    sigma1, sigma2: (d, d) covariances.
    eps: diagonal offset used only when the plain square root fails.
    imag_atol: largest tolerated |imaginary part| on the square root's diagonal.

  Returns:
    The distance as a Python float (≥ 0 up to rounding).

  Raises:
    ValueError: on mismatched shapes, non-finite inputs, or a large imaginary component (the
      inputs are not covariance matrices, e.g. not positive semi-definite).
  """
  mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
  sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
  d = mu1.shape[0]
  if mu1.ndim != 1 or mu2.shape != (d,):
    raise ValueError(f"means must both have shape (d,), got {mu1.shape} and {mu2.shape}")
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"covariances must have shape ({d}, {d}) to match the means, got "
                     f"{sigma1.shape} and {sigma2.shape}")
  for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} contains NaN or inf")
  diff = mu1 - mu2
  covmean = sqrtm_product(sigma1, sigma2, eps)
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=imag_atol):
      raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component of up to "
                       f"{np.max(np.abs(covmean.imag)):.3g} (tolerance {imag_atol}); the inputs "
                       "are probably not positive semi-definite covariance matrices")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_stats(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
  """`frechet_distance` between two accumulators' Gaussians."""
  return frechet_distance(*a.mu_sigma(), *b.mu_sigma(), eps=eps)


def fid_from_features(x1, x2, eps: float = 1e-6) -> float:
  """FID between two (N, d) feature sets. With at least d + 1 vectors on each side this is
  `frechet_distance` of their statistics. With fewer (a covariance of rank < d: small
  benchmark slices, tests), the distance is computed exactly in the N1 x N2 space instead of
  with a d x d matrix square root: writing Σ1 = A Aᵀ and Σ2 = B Bᵀ (A = centred x1ᵀ / √(N1 − 1),
  d x N1), the non-zero eigenvalues of Σ1 Σ2 are those of (AᵀB)(AᵀB)ᵀ, so
  tr((Σ1 Σ2)^{1/2}) = ‖AᵀB‖_* (the sum of AᵀB's singular values), tr Σ1 = ‖A‖²_F. (pytorch-fid
  would add ε·I to both covariances there, which moves the value by O(√ε) per direction.)"""
  x1, x2 = _as_features(x1), _as_features(x2)
  if x1.shape[1] != x2.shape[1]:
    raise ValueError(f"features have dimensions {x1.shape[1]} and {x2.shape[1]}")
  n1, n2, d = x1.shape[0], x2.shape[0], x1.shape[1]
  if n1 < 2 or n2 < 2:
    raise ValueError(f"FID needs at least 2 feature vectors per side, got {n1} and {n2}")
  if min(n1, n2) > d:
    return fid_from_stats(GaussianStats.from_features(x1), GaussianStats.from_features(x2), eps)
  mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
  a = (x1 - mu1) / np.sqrt(n1 - 1)  # Σ1 = aᵀ a
  b = (x2 - mu2) / np.sqrt(n2 - 1)
  nuclear = float(np.sum(np.linalg.svd(a @ b.T, compute_uv=False)))
  diff = mu1 - mu2
  return float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2 * nuclear)
