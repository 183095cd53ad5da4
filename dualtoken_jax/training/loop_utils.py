"""Pieces every training loop shares (tokenizer `training/loop.py`, MLLM `train_mllm.py`):
the non-finite-step guard, the steps/s + ETA timer, and the Orbax log filter of the CLIs."""

from __future__ import annotations

import logging
import time


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


def quiet_orbax(record) -> bool:
  """absl log filter: Orbax logs every save phase at INFO; keep its warnings and errors only."""
  return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname
