"""tpu_scripts/: every script honours DRY_RUN=1 and prints the gcloud commands it would run.

The printed commands are parsed (shell words, `--flag=value` pairs) and the remote command is
run through bash itself with stubs, so what is checked is the arguments gcloud and the workers
would receive, not how the scripts format them.
"""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tpu_scripts"
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def dry_run(script, *args, **env):
  environ = {**os.environ, "DRY_RUN": "1", "PROJECT": "proj", "ZONE": "us-east5-a",
             "TPU_NAME": "dt", "PATH": "/usr/bin:/bin", **env}  # no gcloud on PATH: nothing runs
  out = subprocess.run(["bash", str(SCRIPTS / script), *args], env=environ, capture_output=True,
                       text=True, check=True)
  return out.stdout


def gcloud(line):
  """(positional words, {flag: value, or True for a bare flag}) of one printed command."""
  words = shlex.split(line)
  flags = {}
  for w in words:
    if w.startswith("--"):
      key, sep, value = w[2:].partition("=")
      flags[key] = value if sep else True
  return [w for w in words if not w.startswith("--")], flags


def ssh(out, worker="all"):
  """The remote command of the one `gcloud … ssh dt` in `out`, checking target and scope."""
  lines = [l for l in out.splitlines() if l.startswith("gcloud")]
  assert len(lines) == 1, out
  words, flags = gcloud(lines[0])
  assert words == GCLOUD_TPU + ["ssh", "dt"], words
  assert flags["project"] == "proj" and flags["zone"] == "us-east5-a"
  assert flags["worker"] == worker
  return flags["command"]


def shell_words(command):
  """The remote command as the remote shell splits it (operators such as && are words)."""
  lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def test_create_asks_for_the_named_tpu_type_in_the_zone():
  words, flags = gcloud(dry_run("create.sh", ACCELERATOR_TYPE="v5p-64", RUNTIME_VERSION="rt-1"))
  assert words == GCLOUD_TPU + ["create", "dt"]
  assert flags == {"project": "proj", "zone": "us-east5-a", "accelerator-type": "v5p-64",
                   "version": "rt-1", "spot": True}


def test_delete_names_the_tpu_and_does_not_prompt():
  words, flags = gcloud(dry_run("delete.sh"))
  assert words == GCLOUD_TPU + ["delete", "dt"]
  assert flags == {"project": "proj", "zone": "us-east5-a", "quiet": True}


def test_sync_copies_this_checkout_to_every_worker():
  words, flags = gcloud(dry_run("sync.sh"))
  assert words[:5] == GCLOUD_TPU + ["scp"]
  source, dest = words[5:]
  assert Path(source).resolve() == REPO and dest == "dt:~/dualtoken-jax"
  assert flags == {"recurse": True, "project": "proj", "zone": "us-east5-a", "worker": "all"}


def test_tail_follows_the_newest_log_on_worker_0():
  words = shell_words(ssh(dry_run("tail.sh"), worker="0"))
  assert words[:4] == ["tail", "-n", "100", "-f"]
  assert any(".worker" in w and w.endswith(".log") for w in words), words


def test_setup_installs_jax_tpu_and_requirements_on_all_workers():
  words = shell_words(ssh(dry_run("setup.sh")))
  installs = [words[i + 1:] for i, w in enumerate(words[:-1]) if w == "pip" and words[i + 1] == "install"]
  jax_install = next(w for w in installs if any(x.startswith("jax[tpu]") for x in w))
  assert "jax[tpu]==0.10.2" in jax_install
  req = next(w for w in installs if "-r" in w)
  assert req[req.index("-r") + 1] == "dualtoken-jax/requirements.txt"
  assert "-e" in req and req[req.index("-e") + 1] == "dualtoken-jax"


def test_run_starts_the_training_command_on_all_workers_with_per_worker_logs(tmp_path):
  data = "gs://b/cc12m-{0000..2175}.tar"
  out = dry_run("run.sh", "configs/dualtoken_so400m.py:res=384,stage=1",
                f"--config.data.path={data}", BUCKET="gs://bkt", RUN_NAME="r1")
  command = ssh(out)
  # Run the remote command in bash with `nohup` recording python's argv: quoting, brace
  # expansion and the log redirect are then exactly what a worker's shell does.
  (tmp_path / "dualtoken-jax").mkdir()
  (tmp_path / "dualtoken_venv" / "bin").mkdir(parents=True)
  (tmp_path / "dualtoken_venv" / "bin" / "activate").write_text("")
  argv_file = tmp_path / "argv"
  stub = f'nohup() {{ printf "%s\\n" "$@" > {shlex.quote(str(argv_file))}; }}; '
  subprocess.run(["bash", "-c", stub + command + "\nwait"], cwd=tmp_path, check=True,
                 env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
  argv = argv_file.read_text().splitlines()
  assert argv[:3] == ["python", "-m", "dualtoken_jax.train"]
  assert argv[3:] == ["--config=configs/dualtoken_so400m.py:res=384,stage=1",
                      "--workdir=gs://bkt/runs/r1", "--config.distributed=True",
                      f"--config.data.path={data}"]  # one word: no brace expansion remotely
  assert [p.name for p in tmp_path.glob("r1.worker*.log")], "no per-worker log was written"
  assert "workdir: gs://bkt/runs/r1" in out


def test_run_without_config_is_a_usage_error():
  with pytest.raises(subprocess.CalledProcessError) as e:
    dry_run("run.sh")
  assert "usage" in e.value.stderr


def test_kill_sends_sigterm_to_training_before_sigkill():
  words = shell_words(ssh(dry_run("kill.sh")))
  pkills = [words[i + 1:i + 4] for i, w in enumerate(words) if w == "pkill"]
  assert pkills[:2] == [["-TERM", "-f", "dualtoken_jax.train"],
                        ["-KILL", "-f", "dualtoken_jax.train"]]
  assert "sleep" in words[words.index("pkill"):words.index("pkill", words.index("pkill") + 1)]
