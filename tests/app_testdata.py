"""Checkpoints the app tests serve: the tiny random tokenizer of the MLLM tests and a tiny MLLM
trained for two steps on the bundled photos' conversations (`configs/mllm_tiny.py`), made once
per test session."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import mllm_testdata as T
from dualtoken_jax import config_files
from dualtoken_jax.mllm.train import train_and_evaluate

tokenizer_dir = T.tokenizer_dir


@functools.lru_cache(maxsize=None)
def mllm_dir() -> str:
  root = Path(tempfile.mkdtemp(prefix="app_mllm_"))
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  c = config_files.load("mllm_tiny")
  c.init.tokenizer = T.tokenizer_dir()
  c.text.spm_model = str(T.train_spm(root / "t.model", T.corpus()))
  c.data.train = str(T.write_json(root / "train.json", T.photo_conversations(T.TRAIN_QUESTIONS)))
  c.total_steps, c.optimizer.warmup_steps, c.log_every_steps = 2, 1, 1
  c.checkpoint.every_steps = 2
  train_and_evaluate(c, root / "run")
  return str(root / "run")
