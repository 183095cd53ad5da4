"""Codebook usage statistics for residual quantisers, per depth level, from code histograms.

For one level with counts c_k over K codes (k = 0…K−1), N = Σ c_k and p_k = c_k / N:

* codes_used = #{k : c_k > 0};  dead_codes = K − codes_used;  usage_fraction = codes_used / K.
* entropy_bits H = −Σ_k p_k log2 p_k (0·log 0 = 0);
  normalized_entropy = H / log2 K (1 for uniform usage, 0 for a single code) — the reference's
  "usage entropy / log2(16384)".
* perplexity = 2^H = exp(−Σ p_k ln p_k), the effective number of codes (1…K).
* kl_to_uniform_nats = KL(p ‖ U_K) = Σ_k p_k ln(p_k K) = ln K − H·ln 2 (0 for uniform usage).

DualToken's RVQ shares one table across depths (spec A.5), so besides the (D,) per-level
values `usage_stats(..., pooled=True)` also reports the statistics of all levels' codes
together. `CodeHistogram` accumulates int64 counts of shape (D, K) batch by batch; accumulators
from several shards or hosts add, and `save`/`load` let an evaluation resume.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dualtoken_jax.bridges import tensor_files

_FORMAT = "dualtoken_jax.code_histogram.v1"
STAT_NAMES = ("num_tokens", "codes_used", "dead_codes", "usage_fraction", "entropy_bits",
              "normalized_entropy", "perplexity", "kl_to_uniform_nats")


def histogram(codes, num_codes: int) -> np.ndarray:
  """Per-level code counts on the host: codes (..., D) integers in [0, K) -> int64 (D, K)."""
  c = np.asarray(codes)
  if not np.issubdtype(c.dtype, np.integer):
    raise ValueError(f"codes must be integers, got dtype {c.dtype}")
  if c.ndim < 1:
    raise ValueError("codes must have a trailing depth axis, shape (..., D)")
  depth = c.shape[-1]
  c = c.reshape(-1, depth)
  if c.size and (c.min() < 0 or c.max() >= num_codes):
    raise ValueError(f"codes must lie in [0, {num_codes}), got values in [{c.min()}, {c.max()}]")
  counts = np.zeros((depth, num_codes), np.int64)
  for d in range(depth):
    counts[d] = np.bincount(c[:, d], minlength=num_codes)
  return counts


def histogram_jax(codes, num_codes: int) -> jax.Array:
  """Per-level code counts on device (jit-able): codes (..., D) -> int32 (D, K).

  Out-of-range codes are dropped (no checks under jit); sum per-batch results on the host in
  int64 (`CodeHistogram.add_counts`) so long evaluations cannot overflow.
  """
  codes = jnp.asarray(codes)
  depth = codes.shape[-1]
  flat = codes.reshape(-1, depth).astype(jnp.int32)
  level = jnp.broadcast_to(jnp.arange(depth, dtype=jnp.int32), flat.shape)
  valid = (flat >= 0) & (flat < num_codes)
  index = jnp.where(valid, level * num_codes + flat, depth * num_codes)  # invalid -> dropped
  counts = jnp.zeros((depth * num_codes,), jnp.int32).at[index.reshape(-1)].add(1, mode="drop")
  return counts.reshape(depth, num_codes)


@dataclasses.dataclass
class CodeHistogram:
  """Streaming int64 code counts of one quantiser, shape (D levels, K codes)."""
  counts: np.ndarray

  @classmethod
  def zeros(cls, depth: int, num_codes: int) -> "CodeHistogram":
    if depth < 1 or num_codes < 1:
      raise ValueError(f"depth and num_codes must be positive, got {depth} and {num_codes}")
    return cls(np.zeros((depth, num_codes), np.int64))

  @property
  def depth(self) -> int:
    return self.counts.shape[0]

  @property
  def num_codes(self) -> int:
    return self.counts.shape[1]

  def update(self, codes) -> "CodeHistogram":
    """Counts a batch of codes, shape (..., D) (e.g. (B, h, w, D)). Returns self."""
    c = np.asarray(codes)
    if c.ndim < 1 or c.shape[-1] != self.depth:
      raise ValueError(f"codes must have shape (..., {self.depth}), got {c.shape}")
    self.counts += histogram(c, self.num_codes)
    return self

  def add_counts(self, counts) -> "CodeHistogram":
    """Adds a (D, K) count array (e.g. from `histogram_jax`). Returns self."""
    c = np.asarray(counts)
    if c.shape != self.counts.shape:
      raise ValueError(f"counts must have shape {self.counts.shape}, got {c.shape}")
    if not np.issubdtype(c.dtype, np.integer) or np.any(c < 0):
      raise ValueError("counts must be non-negative integers")
    self.counts += c.astype(np.int64)
    return self

  def merge(self, other: "CodeHistogram") -> "CodeHistogram":
    """A new histogram with both inputs' counts."""
    if other.counts.shape != self.counts.shape:
      raise ValueError(f"cannot merge histograms of shape {self.counts.shape} and "
                       f"{other.counts.shape}")
    return CodeHistogram(self.counts + other.counts)

  def stats(self, pooled: bool = False) -> dict[str, np.ndarray]:
    return usage_stats(self.counts, pooled=pooled)

  def save(self, path: str | os.PathLike) -> None:
    """Writes an `.npz`; written to a temporary name, then renamed."""
    tensor_files.write_npz(path, {"format": np.array(_FORMAT), "counts": self.counts})

  @classmethod
  def load(cls, path: str | os.PathLike) -> "CodeHistogram":
    counts = np.asarray(tensor_files.read_tagged_npz(path, _FORMAT, "a CodeHistogram file")["counts"])
    if counts.ndim != 2 or counts.dtype != np.int64:
      raise ValueError(f"{path}: counts must be int64 (D, K), got {counts.dtype} {counts.shape}")
    return cls(counts)


def usage_stats(counts, pooled: bool = False) -> dict[str, np.ndarray]:
  """Usage statistics of each row (depth level) of a (D, K) count array.

  Args:
    counts: non-negative integer counts, (D, K) or (K,) for a single level.
    pooled: append one more row: the statistics of all levels' codes together (meaningful for a
      codebook shared across depths).

  Returns:
    {name: float64 array of shape (D,) or (D + 1,)} for the names in `STAT_NAMES` (see the
    module docstring). A level without any tokens gets NaN entropy/perplexity/KL.
  """
  c = np.asarray(counts)
  if c.ndim == 1:
    c = c[None]
  if c.ndim != 2 or not np.issubdtype(c.dtype, np.integer) or np.any(c < 0):
    raise ValueError(f"counts must be non-negative integers of shape (D, K), got {c.dtype} "
                     f"{c.shape}")
  if pooled:
    c = np.concatenate([c, c.sum(axis=0, keepdims=True)])
  k = c.shape[1]
  n = c.sum(axis=1).astype(np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    p = c / n[:, None]
    plogp = np.where(c > 0, p * np.log(np.where(c > 0, p, 1.0)), 0.0)
  entropy_nats = np.where(n > 0, -plogp.sum(axis=1), np.nan)
  used = (c > 0).sum(axis=1).astype(np.float64)
  return {
      "num_tokens": n,
      "codes_used": used,
      "dead_codes": k - used,
      "usage_fraction": used / k,
      "entropy_bits": entropy_nats / np.log(2),
      "normalized_entropy": entropy_nats / np.log(k) if k > 1 else np.where(n > 0, 1.0, np.nan),
      "perplexity": np.exp(entropy_nats),
      "kl_to_uniform_nats": np.log(k) - entropy_nats,
  }


def stats_for_logging(stats: Mapping[str, np.ndarray], prefix: str,
                      pooled: bool = False) -> dict[str, float]:
  """Flattens `usage_stats` output to {"{prefix}/level_{d}/{name}": float} (and `/all/`)."""
  out = {}
  for name, values in stats.items():
    for d, v in enumerate(values):
      level = "all" if pooled and d == len(values) - 1 else f"level_{d}"
      out[f"{prefix}/{level}/{name}"] = float(v)
  return out


def write_histogram_png(counts, path: str | os.PathLike, title: str = "") -> Path:
  """One PNG for one quantiser: per level, counts by code index and the sorted (rank) counts.

  Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  c = np.asarray(counts)
  if c.ndim == 1:
    c = c[None]
  stats = usage_stats(c)
  depth, k = c.shape
  fig = Figure(figsize=(12, 2.2 * depth + 0.6), dpi=80)
  FigureCanvasAgg(fig)
  axes = fig.subplots(depth, 2, squeeze=False)
  codes = np.arange(k)
  for d in range(depth):
    ax_idx, ax_rank = axes[d]
    nz = c[d] > 0
    ax_idx.vlines(codes[nz], 0, c[d][nz], linewidth=0.8)  # ≥ 1 px per used code at any K
    ax_idx.set_xlim(0, k - 1)
    ax_idx.set_ylabel(f"level {d}\ncount")
    ax_idx.set_title(f"used {int(stats['codes_used'][d])}/{k}, "
                     f"H/log2K {stats['normalized_entropy'][d]:.3f}, "
                     f"ppl {stats['perplexity'][d]:.1f}", fontsize=9)
    ranked = np.sort(c[d])[::-1]
    ax_rank.plot(np.arange(1, k + 1), np.maximum(ranked, 0.5), linewidth=1)
    ax_rank.set_xscale("log")
    ax_rank.set_yscale("log")
    ax_rank.set_title(f"sorted counts, dead codes ({int(stats['dead_codes'][d])}) drawn at 0.5",
                      fontsize=9)
  axes[-1][0].set_xlabel("code index")
  axes[-1][1].set_xlabel("rank")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png")
  return path


def write_histogram_pngs(histograms: Mapping[str, CodeHistogram | np.ndarray],
                         out_dir: str | os.PathLike) -> dict[str, Path]:
  """`write_histogram_png` for each named quantiser (e.g. {"pixel": …, "semantic": …})."""
  out = {}
  for name, h in histograms.items():
    counts = h.counts if isinstance(h, CodeHistogram) else h
    out[name] = write_histogram_png(counts, Path(out_dir) / f"codebook_{name}.png", title=name)
  return out
