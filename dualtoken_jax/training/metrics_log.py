"""Training metrics: a JSONL file always, TensorBoard when tensorflow is installed, image grids.

`metrics.jsonl` in the workdir holds one JSON object per logged step ({"step": …, name: value});
TensorBoard events go to the workdir through clu's writers (clu.metric_writers imports
TensorFlow, hence optional: `pip install dualtoken-jax[tensorboard]`). Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from PIL import Image


class MetricLogger:

  def __init__(self, workdir: str | Path, tensorboard: bool = True):
    self.workdir = Path(workdir)
    self.active = jax.process_index() == 0
    self._tb = None
    if self.active:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
      if tensorboard:
        self._tb = _tensorboard_writer(self.workdir)

  def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    values = {k: _to_float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.write_scalars(int(step), {k: v for k, v in values.items() if math.isfinite(v)})

  def image(self, step: int, name: str, image: np.ndarray) -> Path | None:
    """Writes `workdir/images/{name}_{step:07d}.png` (and `{name}_latest.png`)."""
    if not self.active:
      return None
    folder = self.workdir / "images"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}_{int(step):07d}.png"
    Image.fromarray(image).save(path)
    Image.fromarray(image).save(folder / f"{name}_latest.png")
    if self._tb is not None:
      self._tb.write_images(int(step), {name: image[None]})
    return path

  def text(self, name: str, text: str) -> None:
    if self.active:
      (self.workdir / f"{name}.txt").write_text(text)

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def _to_float(v) -> float:
  v = float(np.asarray(v))
  return v


def _tensorboard_writer(workdir: Path):
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.info("tensorflow not installed: metrics go to metrics.jsonl only")
    return None
  return metric_writers.create_default_writer(os.fspath(workdir), just_logging=False)
