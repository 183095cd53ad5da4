"""Joining a multi-process job: one process per host (a TPU pod slice, a GPU cluster) or several
on one machine (`python -m dualtoken_jax.launch`, a rehearsal of a pod).

`initialize(enabled)` is the one place a program joins: with the launcher's environment
(`DUALTOKEN_COORDINATOR`, `DUALTOKEN_NUM_PROCESSES`, `DUALTOKEN_PROCESS_ID`) it connects to that
coordinator; otherwise, when `enabled` (`config.distributed`), `jax.distributed.initialize()`
auto-detects the cluster (Cloud TPU, SLURM, Open MPI, ...). On CPU the cross-process
collectives go through gloo.

A process that stops sending heartbeats (killed, its host lost) is noticed by the others within
`DUALTOKEN_HEARTBEAT_TIMEOUT` seconds (default JAX's 100): the runtime then terminates each of
them with an error naming the missing process ("The following tasks are unhealthy (stopped
sending heartbeats): 1"), instead of leaving them blocked in a collective forever. What is on
disk stays the last committed checkpoint (Orbax commits a step atomically), and a restart of
every process resumes from it.
"""

from __future__ import annotations

import logging
import os

import jax

COORDINATOR = "DUALTOKEN_COORDINATOR"          # host:port of process 0
NUM_PROCESSES = "DUALTOKEN_NUM_PROCESSES"
PROCESS_ID = "DUALTOKEN_PROCESS_ID"
HEARTBEAT_TIMEOUT = "DUALTOKEN_HEARTBEAT_TIMEOUT"  # seconds before a silent process is lost
INIT_TIMEOUT = "DUALTOKEN_INIT_TIMEOUT"            # seconds to wait for every process to join


def from_environment() -> dict | None:
  """The launcher's coordinator, process count and id, or None when they are not set."""
  names = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
  present = [n for n in names if os.environ.get(n)]
  if not present:
    return None
  if len(present) != len(names):
    missing = sorted(set(names) - set(present))
    raise ValueError(f"the multi-process environment is incomplete: {present} set, {missing} "
                     "missing (python -m dualtoken_jax.launch sets all three)")
  try:
    num, index = int(os.environ[NUM_PROCESSES]), int(os.environ[PROCESS_ID])
  except ValueError as e:
    raise ValueError(f"{NUM_PROCESSES} and {PROCESS_ID} must be integers: {e}") from None
  if not 0 <= index < num:
    raise ValueError(f"{PROCESS_ID}={index} must be in [0, {NUM_PROCESSES}={num})")
  return dict(coordinator_address=os.environ[COORDINATOR], num_processes=num, process_id=index)


def _timeouts() -> dict:
  out = {}
  for name, arg in ((HEARTBEAT_TIMEOUT, "heartbeat_timeout_seconds"),
                    (INIT_TIMEOUT, "initialization_timeout")):
    if os.environ.get(name):
      try:
        out[arg] = int(os.environ[name])
      except ValueError:
        raise ValueError(f"{name} must be a whole number of seconds, got "
                         f"{os.environ[name]!r}") from None
  return out


def initialize(enabled: bool = False) -> bool:
  """Joins the job if the launcher's environment says so, or if `enabled` (auto-detection).
  Returns whether this is a multi-process run. Safe to call twice."""
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  launched = from_environment()
  if launched is None and not enabled:
    return False
  # CPU devices of different processes talk through gloo (it only concerns the CPU backend).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**(launched or {}), **_timeouts())
  logging.info("process %d of %d joined (%d local / %d global devices)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1
