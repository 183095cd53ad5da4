"""tpu_scripts/: every script honours DRY_RUN=1 and prints the gcloud commands it would run."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"


def dry_run(script, *args, **env):
  environ = {**os.environ, "DRY_RUN": "1", "PROJECT": "proj", "ZONE": "us-east5-a",
             "TPU_NAME": "dt", "PATH": "/usr/bin:/bin", **env}  # no gcloud on PATH: nothing runs
  out = subprocess.run(["bash", str(SCRIPTS / script), *args], env=environ, capture_output=True,
                       text=True, check=True)
  return out.stdout


def command_of(line):
  """The --command string passed to `gcloud … ssh` (after shell unquoting)."""
  words = shlex.split(line)
  return next(w.split("=", 1)[1] for w in words if w.startswith("--command="))


@pytest.mark.parametrize("script,expected", [
    ("create.sh", ["gcloud compute tpus tpu-vm create dt", "--accelerator-type=v5p-64", "--spot"]),
    ("delete.sh", ["gcloud compute tpus tpu-vm delete dt", "--quiet"]),
    ("sync.sh", ["gcloud compute tpus tpu-vm scp --recurse", "--worker=all"]),
    ("tail.sh", ["--worker=0", "tail -n 100 -f"]),
])
def test_simple_scripts(script, expected):
  out = " ".join(shlex.split(dry_run(script, ACCELERATOR_TYPE="v5p-64")))
  for piece in expected:
    assert piece in out, out
  assert "--project=proj" in out and "--zone=us-east5-a" in out


def test_setup_installs_jax_tpu_and_requirements_on_all_workers():
  out = dry_run("setup.sh")
  cmd = command_of(out.strip())
  assert "--worker=all" in out
  assert "jax[tpu]==0.10.2" in cmd and "-r dualtoken-jax/requirements.txt" in cmd


def test_run_starts_the_same_command_on_all_workers_with_per_worker_logs():
  out = dry_run("run.sh", "configs/dualtoken_so400m.py:res=384,stage=1",
                "--config.data.path=gs://b/cc12m-{0000..2175}.tar", BUCKET="gs://bkt", RUN_NAME="r1")
  ssh = out.splitlines()[0]
  assert "--worker=all" in ssh
  cmd = command_of(ssh)
  assert "python -m dualtoken_jax.train --config=configs/dualtoken_so400m.py:res=384,stage=1" in cmd
  assert "--workdir=gs://bkt/runs/r1" in cmd and "--config.distributed=True" in cmd
  assert r"cc12m-\{0000..2175\}.tar" in cmd  # quoted for the remote shell: no brace expansion
  assert "r1.worker" in cmd and "nohup" in cmd
  assert "workdir: gs://bkt/runs/r1" in out


def test_run_without_config_is_a_usage_error():
  with pytest.raises(subprocess.CalledProcessError) as e:
    dry_run("run.sh")
  assert "usage" in e.value.stderr


def test_kill_sends_sigterm_first():
  cmd = command_of(dry_run("kill.sh").strip())
  assert cmd.index("pkill -TERM") < cmd.index("pkill -KILL")
