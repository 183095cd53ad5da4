"""Model FLOPs per step and MFU, for the training logs and `bench train_step`.

FLOPs come from XLA's cost analysis of the *compiled* step (`compiled.cost_analysis()["flops"]`),
not an analytic count: under a mesh that is the partitioned, per-device program, so it is one
chip's share of the step, and MFU = flops / (seconds per step × that chip's peak). Two caveats,
both from XLA: a while loop's body counts once (scanned layers, chunked distances: keep
`scan_layers=False` and a single distance chunk where the figure matters, as `bench train_step`
does), and recomputed (rematerialised) work counts, so with remat the figure is nearer hardware
FLOPs utilisation than model FLOPs.

Peaks are dense bf16 matmul peaks per chip from the vendors' data sheets; a device not in the
table (CPU) has no peak, so only FLOP/s are logged.
"""

from __future__ import annotations

from typing import Any

import jax

# (substring of the lower-cased `device_kind`, dense bf16 FLOP/s per chip); first match wins.
PEAK_BF16_FLOPS = (
    ("v5 lite", 197e12), ("v5e", 197e12),   # TPU v5e ("TPU v5 lite")
    ("v5p", 459e12), ("v5", 459e12),        # TPU v5p
    ("v6 lite", 918e12), ("v6e", 918e12),   # TPU v6e Trillium ("TPU v6 lite")
    ("v4", 275e12),                         # TPU v4
    ("a100", 312e12),
    ("h100 pcie", 756e12), ("h100", 989e12),  # H100 SXM
    ("h200", 989e12),
)


def peak_flops(device: Any = None) -> float | None:
  """Dense bf16 peak FLOP/s of `device` (default: the first device), None if unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind.lower()
  return next((peak for pattern, peak in PEAK_BF16_FLOPS if pattern in kind), None)


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled executable (per device), 0 when XLA gives none."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else (analysis or {})
  return float(analysis.get("flops", 0.0))


def step_flops(jitted, *args) -> float:
  """FLOPs per call of `jitted(*args)` from its compiled form. `lower(...).compile()` fills the
  same cache the call uses, so this costs no second compilation."""
  return compiled_flops(jitted.lower(*args).compile())


def perf_metrics(flops_per_step: float, steps_per_sec: float,
                 peak: float | None = None) -> dict[str, float]:
  """perf/flops_per_step, perf/flops_per_sec and, when the chip's peak is known, perf/mfu."""
  rate = flops_per_step * steps_per_sec
  out = {"perf/flops_per_step": flops_per_step, "perf/flops_per_sec": rate}
  if peak:
    out["perf/mfu"] = rate / peak
  return out
