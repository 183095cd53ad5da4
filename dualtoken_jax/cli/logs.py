"""Logging set-up of the absl programs (`train`, `train_mllm`)."""

from __future__ import annotations

import logging

from absl import logging as absl_logging


def quiet_orbax(record) -> bool:
  """absl log filter: Orbax logs every save phase at INFO; keep its warnings and errors only."""
  return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def setup() -> None:
  """INFO verbosity, Orbax's per-save chatter filtered out."""
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().python_handler.addFilter(quiet_orbax)
