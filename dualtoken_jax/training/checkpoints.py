"""Orbax checkpoints of a training run: state, data-iterator position and metadata per step.

* Async saves every `every_steps`, keeping the newest `keep`; incomplete saves (a kill
  mid-write) leave only temporary directories, which Orbax ignores and cleans up.
* `save` refuses a state holding NaN/Inf: a bad checkpoint never replaces a good one.
* `PreemptionSignal` turns SIGTERM (TPU preemption, `kill`) into a flag the loop checks so it
  saves and exits cleanly.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class NonFiniteStateError(RuntimeError):
  """The state to be saved holds NaN or Inf."""


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree: Any) -> bool:
  """Whether every float leaf is free of NaN/Inf (one compiled reduction per tree structure)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(_all_finite(leaves)) if leaves else True


class Checkpointer:
  """One `ocp.CheckpointManager` with items "state" (pytree), "data" (grain iterator), "meta"."""

  def __init__(self, directory: str | Path, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data", "meta"),
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_iter: Any, meta: dict, force: bool = False) -> bool:
    if not (force or self.manager.should_save(step)):
      return False
    if not all_finite(state):
      raise NonFiniteStateError(f"refusing to checkpoint step {step}: the state holds NaN/Inf")
    saved = self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(meta)))
    if saved:
      logging.info("checkpoint step %d -> %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
    """Restores into `abstract_state`'s shardings (ShapeDtypeStructs with .sharding)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter),
        meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionSignal:
  """Sets `.received` on SIGTERM (and SIGINT if asked) instead of dying mid-step."""

  def __init__(self, also_sigint: bool = False):
    self.received = False
    self._previous = {}
    for sig in (signal.SIGTERM,) + ((signal.SIGINT,) if also_sigint else ()):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint and exiting", signum)
    self.received = True

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# ---------------------------------------------------------------- reading finished runs
def latest_step_dir(path: str | Path) -> Path:
  """`path` itself if it is a step directory (holds `state/`), else the newest step of a
  workdir (`path/checkpoints/<step>`) or of a checkpoint directory (`path/<step>`)."""
  path = Path(path).absolute()
  if (path / "state").is_dir():
    return path
  for root in (path / "checkpoints", path):
    steps = sorted((int(p.name) for p in root.glob("*") if p.name.isdigit()
                    and (p / "state").is_dir()), reverse=True) if root.is_dir() else []
    if steps:
      return root / str(steps[0])
  raise FileNotFoundError(f"no training checkpoint under {path} (expected a train / train_mllm "
                          "workdir, its checkpoints/ directory or one step directory)")


def restore_subtrees(step_dir: Path, abstract: dict) -> dict:
  """Restores only the state fields in `abstract` ({"params": ..., "tokenizer": ...}, leaves
  ShapeDtypeStructs with shardings) from a training checkpoint step directory."""
  item = Path(step_dir) / "state"
  return ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True))


def read_meta(step_dir: Path) -> dict:
  """The JSON metadata a training checkpoint stored ({"step", "config"})."""
  return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(Path(step_dir) / "meta"))
