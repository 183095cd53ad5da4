"""Rehearse a pod on one machine: start N processes of any of the project's programs, joined as one
JAX job over loopback, each with its own simulated devices.

  python -m dualtoken_jax.launch --processes 2 --devices_per_process 4 -- \\
      dualtoken_jax.train --config configs/demo_cpu.py --workdir workdirs/demo_2x4

Everything after `--` is the command: a module of this project (`dualtoken_jax.train`, run as
`python -m`), `python …`, or any program. Each process gets the coordinator address, the process
count and its id in the environment (`parallel/distributed.py`: `DUALTOKEN_COORDINATOR`,
`DUALTOKEN_NUM_PROCESSES`, `DUALTOKEN_PROCESS_ID`, which every program honours), CPU devices
(`--xla_force_host_platform_device_count`) and gloo collectives, so the run takes the code paths
of a real pod: per-host data shards, global arrays assembled from process-local batches,
collective checkpoints, preemption agreed through the distributed runtime, lost-process
detection. Each output line is prefixed with its process id (`[p1] …`).

Exit status: 0 when every process exits 0; the common status when all exit alike (75 when a
preemption stopped them all after a checkpoint); otherwise the first failure's. SIGTERM / SIGINT
sent to the launcher go to every process (so a preempted launcher preempts its job). A process
that dies (kill -9) is noticed by the others within `--heartbeat_timeout` seconds; they stop with
an error naming it, and the launcher reports who died first.

On Cloud TPU or SLURM do not use this: start one process per host (`tpu_scripts/run.sh`) and
`jax.distributed.initialize()` detects the cluster (`config.distributed=True`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from dualtoken_jax.parallel import distributed


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def command_of(argv: list[str]) -> list[str]:
  """The command after `--`: a project module runs as `python -m`; `python` is this Python."""
  if not argv:
    raise ValueError("no command given after --")
  if argv[0].startswith("dualtoken_jax."):
    return [sys.executable, "-m", *argv]
  if os.path.basename(argv[0]) in ("python", "python3"):
    return [sys.executable, *argv[1:]]
  return list(argv)


def process_env(index: int, args) -> dict[str, str]:
  env = dict(os.environ)
  env.update({distributed.COORDINATOR: f"127.0.0.1:{args.port}",
              distributed.NUM_PROCESSES: str(args.processes),
              distributed.PROCESS_ID: str(index),
              distributed.HEARTBEAT_TIMEOUT: str(args.heartbeat_timeout),
              distributed.INIT_TIMEOUT: str(args.init_timeout),
              "PYTHONUNBUFFERED": "1"})
  if args.platform:
    env["JAX_PLATFORMS"] = args.platform
  if args.devices_per_process:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={args.devices_per_process}"])
  return env


def _relay(index: int, stream, out, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      out.write(f"[p{index}] {line}")
      out.flush()
  stream.close()


def describe(code: int) -> str:
  if code < 0:
    return f"killed by {signal.Signals(-code).name}"
  return f"exit status {code}"


def run(args, command: list[str], out=sys.stdout) -> int:
  """Starts the processes, relays their output, waits; returns the job's exit status."""
  lock = threading.Lock()
  procs, relays = [], []
  for i in range(args.processes):
    p = subprocess.Popen(command, env=process_env(i, args), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, errors="replace",
                         start_new_session=True)
    procs.append(p)
    with lock:
      out.write(f"[launch] process {i}: pid {p.pid}\n")
      out.flush()
    relays.append(threading.Thread(target=_relay, args=(i, p.stdout, out, lock), daemon=True))
    relays[-1].start()

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  first_failure, deadline = None, None
  try:
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        if first_failure is None and p.poll() not in (None, 0):
          first_failure = i
          # The others notice a dead process within the heartbeat timeout; after that and a
          # grace period, whoever still runs is stopped.
          deadline = time.monotonic() + args.heartbeat_timeout + args.grace
      if deadline is not None and time.monotonic() > deadline:
        for p in procs:
          if p.poll() is None:
            p.kill()
      time.sleep(0.1)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
  for t in relays:
    t.join(timeout=5)
  codes = [p.returncode for p in procs]
  with lock:
    for i, code in enumerate(codes):
      out.write(f"[launch] process {i}: {describe(code)}"
                f"{' (failed first)' if i == first_failure and len(set(codes)) > 1 else ''}\n")
    out.flush()
  if all(c == codes[0] for c in codes):
    return _status(codes[0])
  return _status(codes[first_failure if first_failure is not None else
                       next(i for i, c in enumerate(codes) if c)])


def _status(code: int) -> int:
  return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    print("usage: python -m dualtoken_jax.launch [options] -- COMMAND ...  (see --help)",
          file=sys.stderr)
    if "-h" in argv or "--help" in argv:
      _parser().print_help()
      return 0
    return 2
  cut = argv.index("--")
  p = _parser()
  args = p.parse_args(argv[:cut])
  if args.processes < 1:
    p.error(f"--processes must be at least 1, got {args.processes}")
  if args.devices_per_process is not None and args.devices_per_process < 1:
    p.error(f"--devices_per_process must be at least 1, got {args.devices_per_process}")
  try:
    command = command_of(argv[cut + 1:])
  except ValueError as e:
    p.error(str(e))
  args.port = args.port or free_port()
  return run(args, command)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.launch", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--processes", type=int, default=2, help="processes (simulated hosts)")
  p.add_argument("--devices_per_process", type=int, default=4,
                 help="CPU devices per process (XLA host platform device count)")
  p.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of the processes ('' = keep)")
  p.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
  p.add_argument("--heartbeat_timeout", type=int, default=30,
                 help="seconds after which a silent process counts as lost")
  p.add_argument("--init_timeout", type=int, default=120,
                 help="seconds to wait for every process to join")
  p.add_argument("--grace", type=int, default=30,
                 help="seconds, after a process failed and the heartbeat timeout, before the "
                      "launcher kills the processes still running")
  return p


if __name__ == "__main__":
  sys.exit(main())
