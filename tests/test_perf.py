"""FLOPs per step and MFU (`training/perf.py`, logged by `training/loop.py`'s timer)."""

import types

import jax
import jax.numpy as jnp
import pytest

from dualtoken_jax.training import loop
from dualtoken_jax.training import perf


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("cpu", None)])
def test_peak_table(kind, peak):
  assert perf.peak_flops(types.SimpleNamespace(device_kind=kind)) == peak


def test_step_flops_of_a_compiled_matmul():
  a, b = jnp.ones((32, 48)), jnp.ones((48, 16))
  assert perf.step_flops(jax.jit(jnp.matmul), a, b) == 2 * 32 * 48 * 16


def test_timer_logs_flops_and_mfu_only_with_a_peak():
  with_peak = loop.StepTimer(0, 100, peak=1e12)
  rates = with_peak.rates(10, flops_per_step=5e9)
  assert rates["perf/flops_per_sec"] == pytest.approx(5e9 * rates["steps_per_sec"])
  assert rates["perf/mfu"] == pytest.approx(rates["perf/flops_per_sec"] / 1e12)
  without = loop.StepTimer(0, 100, peak=None).rates(10, flops_per_step=5e9)
  assert "perf/flops_per_sec" in without and "perf/mfu" not in without
  assert "perf/flops_per_step" not in loop.StepTimer(0, 100).rates(10)
