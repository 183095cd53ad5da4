"""Starting real multi-process jobs from tests: `python -m dualtoken_jax.launch` with the
project's programs, synchronously or in the background (output drained by a thread)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from jsonl import read_jsonl

ROOT = Path(__file__).parent.parent


def start(command: list[str], processes: int = 2, devices: int = 4, heartbeat: int = 10,
          grace: int = 20) -> "Running":
  """Launches `command` (a project module and its flags) as `processes` processes."""
  cmd = [sys.executable, "-m", "dualtoken_jax.launch", f"--processes={processes}",
         f"--devices_per_process={devices}", f"--heartbeat_timeout={heartbeat}",
         f"--grace={grace}", "--", *command]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the launcher sets them
  return Running(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env, cwd=ROOT))


def run(command: list[str], timeout: float = 600, **kwargs) -> tuple[int, str]:
  """Launches and waits: (exit status, output)."""
  job = start(command, **kwargs)
  try:
    out = job.wait(timeout)
  except subprocess.TimeoutExpired:
    job.proc.kill()
    raise AssertionError(f"job still running after {timeout} s:\n{job.output()[-3000:]}")
  return job.returncode, out


class Running:
  """A launched job whose output is drained by a thread (a full pipe would stall the job)."""

  def __init__(self, proc):
    self.proc, self.lines = proc, []
    self._reader = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
    self._reader.start()

  def output(self) -> str:
    return "".join(list(self.lines))

  def pids(self, processes: int = 2) -> dict[int, int]:
    """The process pids the launcher announces first."""
    while True:
      found = dict((int(m.group(1)), int(m.group(2))) for m in (
          re.match(r"\[launch\] process (\d+): pid (\d+)", line) for line in list(self.lines))
          if m)
      if len(found) == processes:
        return found
      assert self.proc.poll() is None, self.output()[-3000:]
      time.sleep(0.1)

  def poll(self):
    return self.proc.poll()

  def wait(self, timeout) -> str:
    self.proc.wait(timeout=timeout)
    self._reader.join(timeout=10)
    return self.output()

  @property
  def returncode(self):
    return self.proc.returncode

  def wait_for_step(self, workdir: Path, step: int, timeout: float = 300) -> None:
    """Until the job's metrics.jsonl holds `step` (fails if the job exits first)."""
    deadline = time.monotonic() + timeout
    path = Path(workdir) / "metrics.jsonl"
    while time.monotonic() < deadline:
      try:
        if path.exists() and any(m.get("step", 0) >= step for m in read_jsonl(path)):
          return
      except json.JSONDecodeError:  # a line being written
        pass
      assert self.proc.poll() is None, self.output()[-3000:]
      time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached in {timeout} s:\n{self.output()[-3000:]}")


def restore(workdir: Path, modules, step: int):
  """A run's state at `step` on one device, whoever wrote it (a topology-free target)."""
  from dualtoken_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from dualtoken_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  from dualtoken_jax.training import state as training_state  # pylint: disable=g-import-not-at-top
  layout = training_state.state_layout(modules, sharding.single_device_mesh())
  ckpt = checkpoints.Checkpointer(Path(workdir) / "checkpoints", every_steps=1, keep=5)
  ocp = checkpoints.ocp
  state = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(layout.targets())))["state"]
  ckpt.close()
  return state
