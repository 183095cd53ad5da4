"""Faults in a real training run: SIGKILL then resume (bitwise), SIGTERM (preemption) saves and
exits, incomplete checkpoints are ignored, bad data is skipped and counted, NaN losses halt."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jsonl import read_jsonl
from dualtoken_jax import DualTokenizer, config_files
from dualtoken_jax.training import checkpoints
from dualtoken_jax.training.loop import PREEMPTED_EXIT_CODE
from dualtoken_jax.tokenizer_training.train import NonFiniteLossError, train_and_evaluate

OVERRIDES = dict(total_steps=1000, log_every_steps=1, max_consecutive_nonfinite=3)


def config(**extra):
  c = config_files.load("configs/demo_cpu.py:test")
  for k, v in {**OVERRIDES, **extra}.items():
    c[k] = v
  c.checkpoint.every_steps = 4
  c.checkpoint.async_save = False
  c.gan.start_step = 0      # discriminator state is part of what must resume exactly
  c.gan.warmup_steps = 1
  c.eval.every_steps = 1000
  c.eval.num_images = 2
  return c


def flags(workdir, **extra):
  args = [f"--workdir={workdir}", "--config=configs/demo_cpu.py:test", "--config.total_steps=1000",
          "--config.log_every_steps=1", "--config.checkpoint.every_steps=4",
          "--config.checkpoint.async_save=False", "--config.gan.start_step=0",
          "--config.gan.warmup_steps=1", "--config.eval.every_steps=1000", "--config.eval.num_images=2"]
  return [sys.executable, "-m", "dualtoken_jax.train", *args, *[f"--config.{k}={v}" for k, v in extra.items()]]


def params_at(workdir, step):
  ckpt = checkpoints.Checkpointer(Path(workdir) / "checkpoints", every_steps=1, keep=10)
  restored = ckpt.manager.restore(step, args=checkpoints.ocp.args.Composite(
      state=checkpoints.ocp.args.StandardRestore()))
  ckpt.close()
  return restored["state"]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600):
  start = time.time()
  while not path.exists():
    if proc.poll() is not None:
      raise AssertionError(f"training exited early with {proc.returncode}: {proc.stdout.read()[-3000:]}")
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError(f"{path} did not appear")
    time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  train_and_evaluate(config(stop_at_step=6), workdir)
  return workdir


def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
  proc = subprocess.Popen(flags(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  wait_for(tmp_path / "checkpoints" / "4", proc)
  proc.send_signal(signal.SIGKILL)  # the process dies mid-run: no cleanup, no final save
  proc.wait()
  # A save that was interrupted leaves a temporary directory; it must be ignored.
  (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234567").mkdir()
  train_and_evaluate(config(stop_at_step=6), tmp_path)

  ours, theirs = params_at(tmp_path, 6), params_at(uninterrupted, 6)
  for name in ("params", "vq_stats", "opt_state", "disc_params", "disc_opt_state", "rng", "step"):
    for a, b in zip(jax.tree.leaves(ours[name]), jax.tree.leaves(theirs[name])):
      np.testing.assert_array_equal(a, b, err_msg=name)
  # Steps 5 and 6 saw the same batches: identical losses, logged once each after the resume.
  resumed = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss/total" in r]
  reference = {r["step"]: r["loss/total"] for r in read_jsonl(uninterrupted / "metrics.jsonl") if "loss/total" in r}
  after = [r for r in resumed if r["step"] > 4]
  assert [r["step"] for r in after][-2:] == [5, 6]
  for r in after[-2:]:
    assert r["loss/total"] == reference[r["step"]]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(flags(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  wait_for(tmp_path / "checkpoints" / "4", proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  # A distinct status, so that a scheduler restarting failed jobs restarts a preempted one.
  assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
  last_line = out.strip().splitlines()[-1]
  assert re.search(r"preempted at step \d+, checkpoint saved", last_line), last_line
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  logged = max(r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss/total" in r)
  assert steps[-1] == logged >= 4  # the step it was at when the signal came, not an older one


def test_bad_images_are_skipped_counted_and_never_crash(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  from dualtoken_jax.data import sample_photos  # pylint: disable=g-import-not-at-top
  for i, path in enumerate(list(sample_photos.sample_photo_paths().values())[:4]):
    (folder / f"ok{i}{Path(path).suffix}").write_bytes(Path(path).read_bytes())
  (folder / "truncated.jpg").write_bytes((folder / "ok3.jpg").read_bytes()[:200]
                                         if (folder / "ok3.jpg").exists() else b"\xff\xd8\xff")
  (folder / "zero.png").write_bytes(b"")
  (folder / "garbage.jpg").write_bytes(os.urandom(500))
  c = config(stop_at_step=3)
  c.data.source, c.data.path = "folder", str(folder)
  train_and_evaluate(c, tmp_path / "run")
  last = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss/total" in r][-1]
  skipped = sum(v for k, v in last.items() if k.startswith("data/skipped_"))
  assert skipped >= 3 and last["finite"] == 1.0


def test_non_finite_losses_halt_without_a_nan_checkpoint(tmp_path, monkeypatch):
  from dualtoken_jax import data  # pylint: disable=g-import-not-at-top
  real, calls = data.make_global_array, []

  def poisoned(local, mesh):
    """Batches from the second on are NaN (so are their losses and gradients)."""
    calls.append(1)
    return real(np.full_like(local, np.nan) if len(calls) > 1 else local, mesh)

  monkeypatch.setattr(data, "make_global_array", poisoned)
  c = config(stop_at_step=20)
  c.checkpoint.every_steps = 1
  with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps ending at step 4"):
    train_and_evaluate(c, tmp_path)
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and all(checkpoints.all_finite(params_at(tmp_path, s)["params"]) for s in saved)
  first = params_at(tmp_path, saved[0])["params"]
  last = params_at(tmp_path, saved[-1])["params"]
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(last)):
    np.testing.assert_array_equal(a, b)  # the NaN steps never touched the weights


def test_a_finished_run_loads_as_a_tokenizer(uninterrupted):
  """`--checkpoint WORKDIR` (CLIs) and `init.tokenizer` (MLLM) read a training run's newest
  checkpoint: its params and EMA codebooks, exactly as saved."""
  tok = DualTokenizer.load(uninterrupted)
  saved = params_at(uninterrupted, 6)
  for name in ("params", "vq_stats"):
    for x, y in zip(jax.tree.leaves(tok.variables[name]), jax.tree.leaves(saved[name])):
      np.testing.assert_array_equal(x, y)
  assert tok.config.image_size == 32
  codes = tok.encode(np.zeros((1, 32, 32, 3), np.float32))
  assert codes.pixel.shape == (1, 4, 4, 4)
  with pytest.raises(FileNotFoundError, match="no training checkpoint"):
    DualTokenizer.load(uninterrupted / "nothing")
