"""The resumable accumulators of an evaluation and their atomic checkpoints.

Layout under `WORKDIR/eval_state/`, one set per JAX process p:

  p{p}_rows_{start}-{stop}.npz   per-image rows of batches [start, stop): written once (under a
                                 temporary name, then renamed), never rewritten (keys, PSNR,
                                 SSIM, labels, top-k ids, embeddings)
  p{p}/{position}/               an Orbax checkpoint (`ocp.CheckpointManager`, this process
                                 only) of everything else after `position` batches:
      arrays/arrays.npz          the accumulators as a flattened pytree (`HostArraysHandler`,
                                 written by whichever process owns the checkpoint): FID
                                 sufficient statistics (float64), code histograms (int64),
                                 the worst/best images
      data/                      the grain iterator state (JSON)
      meta/                      JSON: the run's fingerprint, skip counts and keys, the
                                 list of row files, the extremes' keys, elapsed time

Orbax commits a checkpoint atomically, so a kill leaves the previous one intact. The two newest
are kept: on several hosts the run resumes from the newest position that every process saved.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np
import orbax.checkpoint as ocp

from dualtoken_jax.metrics import fid
from dualtoken_jax.metrics.codebook_stats import CodeHistogram

KEEP_STATES = 2
_ITEMS = ("arrays", "data", "meta")


class FingerprintMismatch(ValueError):
  pass


# ---------------------------------------------------------------- worst / best reconstructions
@dataclasses.dataclass
class Extremes:
  """The `n` lowest- and `n` highest-PSNR images seen, with their input and reconstruction."""
  n: int
  keys: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), "U1"))
  psnr: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.float64))
  originals: np.ndarray | None = None   # (m, H, W, 3) uint8
  recons: np.ndarray | None = None

  def _keep(self, keys, psnr) -> np.ndarray:
    """Indices of the union of the n worst and n best, ties broken by key."""
    worst = np.lexsort((keys, psnr))[:self.n]
    best = np.lexsort((keys, -psnr))[:self.n]
    return np.unique(np.concatenate([worst, best]))

  def offer(self, keys: np.ndarray, psnr: np.ndarray,
            fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    """Considers a batch; `fetch(rows)` gives (originals, recons) of the rows that enter."""
    if self.n <= 0 or not len(keys):
      return
    all_keys = np.concatenate([self.keys.astype(str), np.asarray(keys, str)])
    all_psnr = np.concatenate([self.psnr, np.asarray(psnr, np.float64)])
    keep = self._keep(all_keys, all_psnr)
    new_rows = keep[keep >= len(self.keys)] - len(self.keys)
    if not len(new_rows) and len(keep) == len(self.keys):
      return
    old = keep[keep < len(self.keys)]
    orig_new, recon_new = fetch(new_rows) if len(new_rows) else (None, None)
    parts = lambda mine, new: np.concatenate(
        ([mine[old]] if mine is not None and len(old) else []) +
        ([new] if new is not None else []))
    self.originals, self.recons = parts(self.originals, orig_new), parts(self.recons, recon_new)
    self.keys, self.psnr = all_keys[keep], all_psnr[keep]

  def merge(self, other: "Extremes") -> "Extremes":
    out = Extremes(self.n, self.keys, self.psnr, self.originals, self.recons)
    if len(other.keys):
      out.offer(other.keys, other.psnr, lambda rows: (other.originals[rows], other.recons[rows]))
    return out

  def ranked(self) -> tuple[np.ndarray, np.ndarray]:
    """(worst rows ascending PSNR, best rows descending PSNR)."""
    return (np.lexsort((self.keys, self.psnr))[:self.n],
            np.lexsort((self.keys, -self.psnr))[:self.n])


# ---------------------------------------------------------------- the accumulators
@dataclasses.dataclass
class Accumulators:
  """Everything one process has accumulated after `position` batches."""
  position: int = 0
  iterator_state: Any = None
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  skipped_keys: list[str] = dataclasses.field(default_factory=list)
  fid_real: fid.GaussianStats | None = None
  fid_fake: fid.GaussianStats | None = None
  hist_pix: CodeHistogram | None = None
  hist_sem: CodeHistogram | None = None
  extremes: Extremes | None = None
  elapsed_s: float = 0.0
  row_files: list[str] = dataclasses.field(default_factory=list)
  pending: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
  pending_from: int = 0

  def add_rows(self, **columns: np.ndarray) -> None:
    for name, values in columns.items():
      self.pending.setdefault(name, []).append(np.asarray(values))

  def add_skips(self, counts: dict[str, int], keys: list[str]) -> None:
    for reason, n in counts.items():
      self.skipped[reason] = self.skipped.get(reason, 0) + int(n)
    self.skipped_keys.extend(keys)


def _atomic_savez(path: str, **arrays) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def state_dir(workdir: str) -> str:
  return os.path.join(workdir, "eval_state")


def _manager(workdir: str, process: int) -> ocp.CheckpointManager:
  """This process's own checkpoints (no cross-process barriers: hosts save independently).

  The JSON handlers get the same single-process options as the manager, and the arrays go
  through `HostArraysHandler`: Orbax's default handlers write only on process 0 (its numpy
  handler checks `process_index() == 0` whatever the options), so every other process would
  commit empty checkpoints (seen in a real 2-process run: p1's `meta/` and `arrays/` held no
  data and its resume failed)."""
  directory = os.path.join(os.path.abspath(state_dir(workdir)), f"p{process}")
  os.makedirs(directory, exist_ok=True)  # Orbax will not create it for a process subset.
  only_me = ocp.options.MultiprocessingOptions(
      primary_host=process, active_processes={process},
      barrier_sync_key_prefix=f"eval_p{process}")
  options = ocp.CheckpointManagerOptions(
      max_to_keep=KEEP_STATES, create=False, enable_async_checkpointing=False,
      cleanup_tmp_directories=True, multiprocessing_options=only_me)
  handlers = {"arrays": HostArraysHandler(),
              "data": ocp.JsonCheckpointHandler(multiprocessing_options=only_me),
              "meta": ocp.JsonCheckpointHandler(multiprocessing_options=only_me)}
  assert set(handlers) == set(_ITEMS)
  return ocp.CheckpointManager(directory, item_handlers=handlers, options=options)


class HostArraysHandler(ocp.CheckpointHandler):
  """One process's numpy pytree as `arrays.npz` in the checkpoint's item directory (dtypes
  kept: the float64 FID statistics stay exact). Orbax's temporary directory and commit make
  the checkpoint atomic as for its own handlers."""
  _FILE = "arrays.npz"

  def save(self, directory, args: "HostArraysSave") -> None:
    flat = {}

    def walk(node, prefix):
      for k, v in node.items():
        if isinstance(v, dict):
          walk(v, f"{prefix}{k}/")
        elif v is not None:
          flat[prefix + k] = np.asarray(v)
    walk(args.item, "")
    with open(os.path.join(os.fspath(directory), self._FILE), "wb") as f:
      np.savez(f, **flat)

  def restore(self, directory, args: "HostArraysRestore | None" = None) -> dict[str, Any]:
    del args
    path = os.path.join(os.fspath(directory), self._FILE)
    if not os.path.isfile(path):  # Orbax's own array layout, before this handler
      raise FingerprintMismatch(
          f"{directory} has no {self._FILE}: an evaluation state written by an older version. "
          "Use a new --workdir, or delete its eval_state/ to start over.")
    tree: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as f:
      for name in f.files:
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
          node = node.setdefault(p, {})
        node[leaf] = f[name]
    return tree


@ocp.args.register_with_handler(HostArraysHandler, for_save=True)
@dataclasses.dataclass
class HostArraysSave(ocp.args.CheckpointArgs):
  item: dict[str, Any]


@ocp.args.register_with_handler(HostArraysHandler, for_restore=True)
@dataclasses.dataclass
class HostArraysRestore(ocp.args.CheckpointArgs):
  pass


def _arrays(acc: Accumulators) -> dict[str, Any]:
  """The numeric accumulators as a pytree of numpy arrays (absent ones left out)."""
  tree: dict[str, Any] = {}
  for name in ("fid_real", "fid_fake"):
    s = getattr(acc, name)
    if s is not None:
      tree[name] = {"count": np.array(s.count, np.int64), "total": np.asarray(s.total),
                    "outer": np.asarray(s.outer)}
  for name in ("hist_pix", "hist_sem"):
    if getattr(acc, name) is not None:
      tree[name] = np.asarray(getattr(acc, name).counts)
  ex = acc.extremes
  if ex is not None and len(ex.keys):
    tree["extremes"] = {"psnr": ex.psnr, "originals": ex.originals, "recons": ex.recons}
  return tree


def save(acc: Accumulators, workdir: str, process: int, fingerprint: dict) -> None:
  """Flushes pending rows to a new row file, then checkpoints the state atomically."""
  d = state_dir(workdir)
  os.makedirs(d, exist_ok=True)
  if any(acc.pending.values()):
    name = f"p{process}_rows_{acc.pending_from:08d}-{acc.position:08d}.npz"
    _atomic_savez(os.path.join(d, name),
                  **{k: np.concatenate(v) for k, v in acc.pending.items() if v})
    acc.row_files.append(name)
  acc.pending, acc.pending_from = {}, acc.position

  ex = acc.extremes
  meta = dict(fingerprint=fingerprint, position=acc.position, skipped=acc.skipped,
              skipped_keys=acc.skipped_keys, elapsed_s=acc.elapsed_s, row_files=acc.row_files,
              extremes_n=ex.n if ex else 0,
              extremes_keys=ex.keys.tolist() if ex is not None else [])
  items = {"data": ocp.args.JsonSave({"iterator_state": acc.iterator_state})}
  tree = _arrays(acc)
  if tree:  # Orbax refuses an empty pytree (e.g. zero-shot accuracy only).
    items["arrays"] = HostArraysSave(tree)
  meta["has_arrays"] = bool(tree)
  with _manager(workdir, process) as manager:
    manager.save(acc.position, force=True,
                 args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items))


def saved_positions(workdir: str, process: int) -> list[int]:
  """Positions of this process's checkpoints, ascending."""
  if not os.path.isdir(os.path.join(state_dir(workdir), f"p{process}")):
    return []
  with _manager(workdir, process) as manager:
    return sorted(manager.all_steps())


def discard_after(workdir: str, process: int, position: int | None) -> list[int]:
  """Deletes this process's checkpoints newer than `position` (None: all of them), which the
  other processes did not reach; resuming from `position` saves those positions anew (Orbax
  refuses to overwrite a step). Returns the deleted positions."""
  newer = [p for p in saved_positions(workdir, process) if position is None or p > position]
  if newer:
    with _manager(workdir, process) as manager:
      for p in newer:
        manager.delete(p)
  return newer


def load(workdir: str, process: int, position: int, fingerprint: dict) -> Accumulators:
  """The state saved after `position` batches; raises `FingerprintMismatch` if the run differs."""
  with _manager(workdir, process) as manager:
    meta = manager.restore(position, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    check_fingerprint(meta["fingerprint"], fingerprint, workdir)
    items = {"arrays": HostArraysRestore()} if meta["has_arrays"] else {}
    restored = manager.restore(position, args=ocp.args.Composite(
        data=ocp.args.JsonRestore(), **items))
  arrays = restored.get("arrays") or {}
  acc = Accumulators(position=meta["position"],
                     iterator_state=restored["data"]["iterator_state"],
                     skipped={k: int(v) for k, v in meta["skipped"].items()},
                     skipped_keys=[str(k) for k in meta["skipped_keys"]],
                     elapsed_s=float(meta["elapsed_s"]), row_files=list(meta["row_files"]),
                     pending_from=meta["position"])
  for name in ("fid_real", "fid_fake"):
    if name in arrays:
      s = arrays[name]
      setattr(acc, name, fid.GaussianStats(int(s["count"]), np.asarray(s["total"]),
                                           np.asarray(s["outer"])))
  for name in ("hist_pix", "hist_sem"):
    if name in arrays:
      setattr(acc, name, CodeHistogram(np.asarray(arrays[name])))
  if meta["extremes_n"]:
    acc.extremes = Extremes(meta["extremes_n"])
    if "extremes" in arrays:
      e = arrays["extremes"]
      acc.extremes = Extremes(meta["extremes_n"], np.asarray(meta["extremes_keys"], str),
                              np.asarray(e["psnr"]), np.asarray(e["originals"]),
                              np.asarray(e["recons"]))
  return acc


def load_rows(workdir: str, acc: Accumulators) -> dict[str, np.ndarray]:
  """All per-image rows of this process: the saved row files plus the pending rows."""
  columns: dict[str, list[np.ndarray]] = {}
  for name in acc.row_files:
    with np.load(os.path.join(state_dir(workdir), name), allow_pickle=False) as f:
      for k in f.files:
        columns.setdefault(k, []).append(f[k])
  for k, v in acc.pending.items():
    columns.setdefault(k, []).extend(v)
  return {k: np.concatenate(v) for k, v in columns.items()}


def check_fingerprint(saved: dict, current: dict, workdir: str) -> None:
  if saved == current:
    return
  diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in diff)
  raise FingerprintMismatch(
      f"{workdir} holds an evaluation with different settings ({details}). Use a new "
      "--workdir, or delete its eval_state/ to start over.")


def common_position(local_positions: list[int]) -> int | None:
  """The newest position saved by every process (None: start from scratch)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return local_positions[-1] if local_positions else None
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = np.full((KEEP_STATES,), -1, np.int32)
  tail = local_positions[-KEEP_STATES:]
  mine[:len(tail)] = tail
  every = np.asarray(multihost_utils.process_allgather(mine))
  common = set(every[0].tolist())
  for row in every[1:]:
    common &= set(row.tolist())
  common.discard(-1)
  return max(common) if common else None
