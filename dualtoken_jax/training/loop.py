"""The step loop both trainers share (`tokenizer_training/train.py`, `mllm/train.py`): logging,
evaluation and checkpoint cadence, the non-finite-step guard, the steps/s + ETA timer."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax

from dualtoken_jax.training import checkpoints


class NonFiniteLossError(RuntimeError):
  """Too many consecutive steps with a NaN/Inf loss or gradient."""


class NonFiniteGuard:
  """Counts consecutive non-finite steps (whose updates the step functions skip) and raises
  `NonFiniteLossError` once `max_in_a_row` happened in a row."""

  def __init__(self, max_in_a_row: int):
    self.max_in_a_row = max_in_a_row
    self.in_a_row = 0

  def update(self, finite: bool, step: int, last_checkpoint: int | None) -> None:
    self.in_a_row = 0 if finite else self.in_a_row + 1
    if finite:
      return
    logging.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                    step, self.in_a_row)
    if self.in_a_row >= self.max_in_a_row:
      raise NonFiniteLossError(f"{self.in_a_row} consecutive non-finite steps ending at step "
                               f"{step}; last checkpoint: step {last_checkpoint}")


class StepTimer:
  """steps/s and ETA between logging points."""

  def __init__(self, start_step: int, total_steps: int):
    self._step, self._time, self._total = start_step, time.perf_counter(), total_steps

  def rates(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return {"steps_per_sec": rate, "eta_hours": (self._total - step) / max(rate, 1e-9) / 3600}


def run_training_loop(state, *, config, start: int, train_iter, train_step: Callable,
                      run_eval: Callable, ckpt, logger) -> tuple[Any, dict]:
  """The step loop both trainers share: steps `start`..`last` (`stop_at_step` or
  `total_steps`), metrics every `log_every_steps` (with throughput and per-reason skip
  totals), `run_eval(state, step)` at step 0 and every `eval.every_steps`, Orbax checkpoints
  (forced at the last step and on preemption), a halt on repeated non-finite steps.
  `train_step(state, step, host_batch) -> (state, metrics)`. Closes `ckpt` and `logger`.
  Returns (state, the last evaluation)."""
  last = min(config.stop_at_step or config.total_steps, config.total_steps)
  preempt = checkpoints.PreemptionSignal()
  guard = NonFiniteGuard(config.max_consecutive_nonfinite)
  timer = StepTimer(start, config.total_steps)
  meta = lambda step: {"step": step, "config": config.to_dict()}
  last_eval = run_eval(state, 0) if start == 0 else {}  # the starting point, for comparison
  try:
    for step in range(start, last):
      state, metrics = train_step(state, step, next(train_iter))
      done = step + 1
      guard.update(bool(metrics["finite"]), done, ckpt.latest_step())
      if done % config.log_every_steps == 0 or done == last:
        metrics = jax.device_get(metrics)
        metrics.update(timer.rates(done))
        metrics.update({f"data/skipped_{k}": v for k, v in train_iter.skipped_total.items()})
        logger.scalars(done, metrics)
      if done % config.eval.every_steps == 0 or done == last:
        last_eval = run_eval(state, done)
      if preempt.received or done == last:
        ckpt.save(done, state, train_iter, meta(done), force=True)
        break
      ckpt.save(done, state, train_iter, meta(done))
  finally:
    ckpt.close()
    preempt.restore()
    logger.close()
  return state, last_eval
