"""Orbax checkpoints of a training run: state, data-iterator position and metadata per step.

* Async saves every `every_steps`, keeping the newest `keep`; incomplete saves (a kill
  mid-write) leave only temporary directories, which Orbax ignores and cleans up.
* `save` refuses a state holding NaN/Inf: a bad checkpoint never replaces a good one.
* Checksums are optional here (`checksums=True`, `config.checkpoint.checksums`), off by default
  for speed: a manifest needs the save finished and every byte read back (seconds to minutes
  per save for a large state, every `every_steps`, and no overlap of async saves with the
  steps). Saves are atomic anyway (a killed save is never a step directory), and every restore
  checks that the restored state is finite; the manifest adds detection of flipped bits on disk
  that stay finite. When a step directory has one, every restore verifies it. (A
  `DualTokenizer.save` directory always gets one: written once, read by every user.)
* `PreemptionSignal` turns SIGTERM (TPU preemption, `kill`) into a stop the loop checks so it
  saves and exits cleanly; with several processes, at a step all of them agree on.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from dualtoken_jax.bridges import tensor_files


class NonFiniteStateError(RuntimeError):
  """The state to be saved holds NaN or Inf."""


all_finite = tensor_files.all_finite  # one compiled reduction per tree structure


class Checkpointer:
  """One `ocp.CheckpointManager` with items "state" (pytree), "data" (grain iterator), "meta"."""

  def __init__(self, directory: str | Path, *, every_steps: int, keep: int, async_save: bool = True,
               checksums: bool = False):
    self.directory = Path(directory).absolute()
    self.checksums = checksums
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
      if self.checksums:  # the manifest needs the finished files: this save becomes synchronous
        self.manager.wait_until_finished()  # finalised: every host's files are in place
        if jax.process_index() == 0:
          tensor_files.write_checksums(self.directory / str(step))
      logging.info("checkpoint step %d -> %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
    """Restores into `abstract_state`'s shardings (ShapeDtypeStructs with .sharding); verifies
    the step's checksum manifest if it has one and that the state is finite."""
    tensor_files.verify_checksums(self.directory / str(step))
    saved_by = _data_files(self.directory / str(step))
    same_hosts = not saved_by or len(saved_by) == jax.process_count()
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if same_hosts:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if not same_hosts:  # written by another number of processes: grain cannot map it itself
      if not hasattr(data_iter, "set_state_from_hosts"):
        raise ValueError(f"checkpoint step {step} was saved by {len(saved_by)} process(es); this "
                         "run's data stream cannot resume it with "
                         f"{jax.process_count()}: use the original process count")
      data_iter.set_state_from_hosts([json.loads(f.read_text()) for f in saved_by],
                                     jax.process_index(), jax.process_count())
      logging.warning("step %d was saved by %d process(es), resumed by %d: the data stream "
                      "restarts at the latest global batch any of them had begun", step,
                      len(saved_by), jax.process_count())
    tensor_files.check_finite(restored["state"], f"checkpoint {self.directory / str(step)}")
    return restored["state"], dict(restored["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionSignal:
  """SIGTERM (TPU preemption, `kill`) as a stop that every process agrees on, instead of dying
  mid-step.

  One process: a Python handler sets `.received`. Several processes: a flag per process would
  let the one that got the signal leave the loop while the others enter the next step's
  collectives (a hang, or a checkpoint only some hosts wrote). There the signal is left to the
  JAX distributed runtime's preemption notifier, which tells every process, and `reached(step)`
  (Orbax's `reached_preemption`, a sync point in the coordination service) turns true at the
  same step on all of them. Call `reached` at every step boundary, on every process."""

  def __init__(self, manager: ocp.CheckpointManager, also_sigint: bool = False):
    self.received = False
    self._manager = manager
    self._previous = {}
    self._multiprocess = jax.process_count() > 1
    signals = () if self._multiprocess else (signal.SIGTERM,)
    for sig in signals + ((signal.SIGINT,) if also_sigint else ()):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint and exiting", signum)
    self.received = True

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (the same answer on every process)."""
    if self._multiprocess and not self.received and self._manager.reached_preemption(step):
      logging.warning("preemption notice: every process saves step %d and exits", step)
      self.received = True
    return self.received

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _data_files(step_dir: Path) -> list[Path]:
  """The per-process data-iterator states of a step (grain's `process_<i>-of-<n>.json`), in
  process order."""
  files = list((step_dir / "data").glob("process_*-of-*.json"))
  index = lambda f: int(f.name.split("_")[1].split("-of-")[0])
  return sorted(files, key=index)


# ---------------------------------------------------------------- reading finished runs
def latest_step_dir(path: str | Path) -> Path:
  """`path` itself if it is a step directory (holds `state/`), else the newest step of a
  workdir (`path/checkpoints/<step>`) or of a checkpoint directory (`path/<step>`)."""
  path = Path(path).absolute()
  if (path / "state").is_dir():
    if not (path / "meta").is_dir():
      saved = (" It looks like a saved DualTokenizer (DualTokenizer.save: config.json + state/): "
               "load it with DualTokenizer.load or a tokenizer program's --checkpoint, or use it "
               "as an MLLM's init.tokenizer." if (path / "config.json").is_file() else "")
      raise FileNotFoundError(f"{path} holds state/ but no meta/, so it is not a training "
                              f"checkpoint step (expected a train / train_mllm workdir, its "
                              f"checkpoints/ directory or one step directory).{saved}")
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
  ShapeDtypeStructs with shardings) from a training checkpoint step directory, after verifying
  its checksum manifest if it has one; the restored weights must be finite."""
  tensor_files.verify_checksums(step_dir)
  item = Path(step_dir) / "state"
  restored = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True))
  tensor_files.check_finite(restored, f"checkpoint {step_dir}")
  return restored


def read_meta(step_dir: Path) -> dict:
  """The JSON metadata a training checkpoint stored ({"step", "config"})."""
  if not (Path(step_dir) / "meta").is_dir():
    raise FileNotFoundError(f"{step_dir} has no meta/: not a training checkpoint step directory")
  return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(Path(step_dir) / "meta"))


class CheckpointKindError(ValueError):
  """A training checkpoint of another kind than the one asked for (a tokenizer run given to
  `chat`, an MLLM run given to a tokenizer program)."""


RUN_KINDS = {"tokenizer": "a tokenizer training run (`python -m dualtoken_jax.train`)",
             "mllm": "an MLLM training run (`python -m dualtoken_jax.train_mllm`)"}


def run_kind(config: dict) -> str | None:
  """"tokenizer" or "mllm" for a stored training config (by its model fields), else None."""
  model = config.get("model") if isinstance(config, dict) else None
  if not isinstance(model, dict):
    return None
  if "llm" in model:
    return "mllm"
  return "tokenizer" if "vq_pix" in model else None


def read_run(path: str | Path, expected: str) -> tuple[Path, dict]:
  """(step directory, stored config) of the newest checkpoint under `path` (`latest_step_dir`),
  which must be an `expected` run ("tokenizer" | "mllm"); else `CheckpointKindError` saying
  what `path` is and what was expected."""
  step_dir = latest_step_dir(path)
  config = read_meta(step_dir).get("config") or {}
  found = run_kind(config)
  if found != expected:
    what = RUN_KINDS.get(found, "a training checkpoint of unknown kind (no model.llm or "
                                "model.vq_pix in its config)")
    raise CheckpointKindError(f"{path} is {what} (step {step_dir.name}), but {RUN_KINDS[expected]} "
                              "was expected here")
  return step_dir, config
