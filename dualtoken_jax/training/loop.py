"""The step loop both trainers share (`tokenizer_training/train.py`, `mllm/train.py`): logging,
evaluation and checkpoint cadence, the non-finite-step guard, the steps/s + ETA timer (with
FLOPs per step and MFU, `perf.py`), and the preemption exit.

Nothing in the loop reads a device value back at every step: the non-finite counters live on
device and are read at logging and checkpoint steps only, so the host keeps enqueueing steps
while the devices run (async dispatch)."""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dualtoken_jax.training import checkpoints
from dualtoken_jax.training import perf


class NonFiniteLossError(RuntimeError):
  """Too many consecutive steps with a NaN/Inf loss or gradient."""


class Preempted(RuntimeError):
  """The run was stopped by SIGTERM (preemption) after saving a checkpoint of `step`; re-running
  the same command resumes from it. The programs exit with `PREEMPTED_EXIT_CODE`."""

  def __init__(self, step: int):
    super().__init__(f"preempted at step {step}, checkpoint saved")
    self.step = step


# sysexits' EX_TEMPFAIL: "try again later" -- what a scheduler that restarts failed jobs should do.
PREEMPTED_EXIT_CODE = 75


@functools.partial(jax.jit, static_argnums=3)
def _count_nonfinite(counts: jax.Array, finite: jax.Array, step: jax.Array, limit: int):
  """counts = [in a row now, total, first step that ended `limit` in a row (0: none yet)];
  updated on device, so no step waits for the host."""
  bad = (finite == 0).astype(jnp.int32)
  in_a_row = (counts[0] + 1) * bad
  halt = jnp.where((counts[2] == 0) & (in_a_row >= limit), step, counts[2])
  return jnp.stack([in_a_row, counts[1] + bad, halt])


class NonFiniteGuard:
  """Counts non-finite steps (whose updates the step functions skip) on device; `check` raises
  `NonFiniteLossError` once `max_in_a_row` happened in a row. Checking reads the counters back
  (a host sync), so the loop checks only at logging and checkpoint steps."""

  def __init__(self, max_in_a_row: int):
    self.max_in_a_row = max_in_a_row
    self._counts = jnp.zeros((3,), jnp.int32)
    self._reported = 0

  def update(self, finite: jax.Array, step: int) -> None:
    self._counts = _count_nonfinite(self._counts, jnp.asarray(finite, jnp.int32),
                                    jnp.asarray(step, jnp.int32), self.max_in_a_row)

  def check(self, step: int, last_checkpoint: int | None) -> dict[str, int]:
    """Raises if `max_in_a_row` non-finite steps came in a row; else returns the counters."""
    in_a_row, total, halt = (int(x) for x in jax.device_get(self._counts))
    if total > self._reported:
      logging.warning("%d non-finite step(s) up to step %d, updates skipped (%d in a row now)",
                      total - self._reported, step, in_a_row)
      self._reported = total
    if halt:
      raise NonFiniteLossError(f"{self.max_in_a_row} consecutive non-finite steps ending at step "
                               f"{halt}; last checkpoint: step {last_checkpoint}")
    return {"nonfinite_steps": total, "nonfinite_in_a_row": in_a_row}


class StepTimer:
  """steps/s and ETA between logging points; with `flops_per_step` (per device, `perf.py`) also
  perf/flops_per_sec and, where the chip's peak is known, perf/mfu."""

  def __init__(self, start_step: int, total_steps: int, peak: float | None = None):
    self._step, self._time, self._total = start_step, time.perf_counter(), total_steps
    self.peak = peak

  def rates(self, step: int, flops_per_step: float | None = None) -> dict[str, float]:
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    out = {"steps_per_sec": rate, "eta_hours": (self._total - step) / max(rate, 1e-9) / 3600}
    if flops_per_step:
      out.update(perf.perf_metrics(flops_per_step, rate, self.peak))
    return out


def run_training_loop(state, *, config, start: int, train_iter, train_step: Callable,
                      run_eval: Callable, ckpt, logger,
                      step_flops: Callable | None = None) -> tuple[Any, dict]:
  """The step loop both trainers share: steps `start`..`last` (`stop_at_step` or
  `total_steps`), metrics every `log_every_steps` (with throughput and per-reason skip
  totals), `run_eval(state, step)` at step 0 and every `eval.every_steps`, Orbax checkpoints
  (forced at the last step and on preemption), a halt on repeated non-finite steps.
  `train_step(state, step, host_batch) -> (state, metrics)`. `step_flops(state, step,
  host_batch)`, if given, is the per-device FLOPs of that step (`perf.step_flops` of the jitted
  step); it is asked before each step that ends a logging interval, and the FLOPs, FLOP/s and
  MFU are logged beside steps/s. Closes `ckpt` and `logger`. Returns (state, the last
  evaluation)."""
  last = min(config.stop_at_step or config.total_steps, config.total_steps)
  preempt = checkpoints.PreemptionSignal(ckpt.manager)
  guard = NonFiniteGuard(config.max_consecutive_nonfinite)
  timer = StepTimer(start, config.total_steps, perf.peak_flops())
  flops = None
  meta = lambda step: {"step": step, "config": config.to_dict()}
  last_eval = run_eval(state, 0) if start == 0 else {}  # the starting point, for comparison
  try:
    for step in range(start, last):
      batch = next(train_iter)
      done = step + 1
      logs = done % config.log_every_steps == 0 or done == last
      if step_flops is not None and logs:  # before the step: it may donate `state`
        flops = step_flops(state, step, batch)
      state, metrics = train_step(state, step, batch)
      guard.update(metrics["finite"], done)
      stopping = preempt.reached(done) or done == last
      if done % config.log_every_steps == 0 or stopping:
        metrics = jax.device_get(metrics)
        metrics.update(guard.check(done, ckpt.latest_step()))
        metrics.update(timer.rates(done, flops))
        metrics.update({f"data/skipped_{k}": v for k, v in train_iter.skipped_total.items()})
        logger.scalars(done, metrics)
      if done % config.eval.every_steps == 0 or done == last:
        last_eval = run_eval(state, done)
      if stopping:
        ckpt.save(done, state, train_iter, meta(done), force=True)
        break
      if ckpt.should_save(done):
        guard.check(done, ckpt.latest_step())  # never checkpoint in the middle of a NaN run
        ckpt.save(done, state, train_iter, meta(done))
  finally:
    ckpt.close()
    preempt.restore()
    logger.close()
  if preempt.received:
    raise Preempted(done)
  return state, last_eval
