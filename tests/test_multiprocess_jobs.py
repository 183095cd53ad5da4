"""`evaluate` and `tokenize` as real multi-process jobs (`python -m dualtoken_jax.launch`:
processes joined over loopback, 4 CPU devices each), against one process with 8 devices, with
the small reference-format tokenizer of tests/fixtures and the bundled photos:

* evaluate, 2 processes x 4 devices: the metrics.json of 1 x 8 (only "throughput" and
  "settings.process_count" differ), written by process 0 only; after losing process 1's newest
  state, a rerun resumes both processes from the newest position both saved (the row files of
  the batches before it untouched) and writes the same metrics;
* tokenize, 2 processes: per-host shards and manifest parts whose union holds every input
  exactly once, with the codes of a 1-process run, each host holding its own share;
* tokenize, kill -9 of one process mid-run: a 1-process rerun encodes only what no complete
  shard holds, leaves the complete shards untouched, and the union is again every key once.

In one process (fast): host writers sharing a directory (what each kind of rerun may touch),
an eval state's positions beyond the other hosts' dropped, npz output refused with several
processes.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

from dualtoken_jax import evaluate as evaluate_cli
from dualtoken_jax import tokenize
from dualtoken_jax.data import code_shards, sample_photos

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
SOURCE = ["--reference", str(FIXTURES / "dualtoken_ref_a" / "checkpoint.safetensors")]
HEARTBEAT = 10  # seconds: how soon a killed process is noticed


def launcher(*command, processes=2):
  """The job's Popen: the launcher, its output on a pipe (read it, or it stalls the job)."""
  cmd = [sys.executable, "-m", "dualtoken_jax.launch", f"--processes={processes}",
         "--devices_per_process=4", f"--heartbeat_timeout={HEARTBEAT}", "--grace=5", "--",
         *command]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the launcher sets them
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=ROOT)


def launch(*command, processes=2):
  proc = launcher(*command, processes=processes)
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


# ---------------------------------------------------------------- evaluate
def eval_flags(workdir):
  return [*SOURCE, "--data", "sample", "--workdir", str(workdir), "--metrics", "psnr,ssim,usage",
          "--batch_size", "8", "--checkpoint_every", "1", "--num_threads", "0", "--no_progress",
          "--no_plots"]


def comparable(metrics):
  """metrics.json without what legitimately depends on the process count and the clock."""
  out = json.loads(json.dumps(metrics))
  del out["throughput"], out["settings"]["process_count"]
  return out


def assert_same_metrics(a, b):
  """Integers (counts, histograms' codes used) exact, floats within 1e-9 relative. Every
  image's PSNR/SSIM and codes come from the same per-device program (one image per device in
  both runs: 8 devices, global batch 8), so they are the same bits; only the order of the
  float64 sums over images and the histogram reductions differ (~1e-16). A missing or doubled
  image moves PSNR by ~1e-2 and the code counts by whole codes."""
  if isinstance(a, dict):
    assert sorted(a) == sorted(b)
    for k in a:
      assert_same_metrics(a[k], b[k])
  elif isinstance(a, float):
    assert b == pytest.approx(a, rel=1e-9, abs=1e-12)
  else:
    assert a == b


def stat(path):
  s = os.stat(path)
  return s.st_ino, s.st_mtime_ns


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory):
  one = tmp_path_factory.mktemp("eval_1x8")
  assert evaluate_cli.main(eval_flags(one)) == 0  # this process: 8 devices (conftest)
  two = tmp_path_factory.mktemp("eval_2x4")
  code, out = launch("dualtoken_jax.evaluate", *eval_flags(two))
  assert code == 0, out[-3000:]
  return one, two, out


def test_evaluate_2x4_writes_the_metrics_of_1x8_from_process_0(evaluations):
  one, two, out = evaluations
  a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
  assert b["settings"]["process_count"] == 2 and a["settings"]["process_count"] == 1
  assert b["num_images"] == len(sample_photos.sample_photo_paths()) == 10
  assert_same_metrics(comparable(a), comparable(b))
  # The same per-image rows (in process order: host p read records p, p+2, ...).
  rows = lambda d: sorted((d / "per_image.csv").read_text().splitlines()[1:])
  assert rows(one) == rows(two)
  # Process 0 wrote the report; process 1 only its own resumable state.
  assert "[p0] report written" in out and "[p1] report written" not in out
  assert sorted(p.name for p in two.iterdir()) == ["eval_state", "metrics.json", "per_image.csv"]
  state = two / "eval_state"
  assert sorted(p.name for p in state.iterdir()) == [
      "p0", "p0_rows_00000000-00000001.npz", "p0_rows_00000001-00000002.npz",
      "p1", "p1_rows_00000000-00000001.npz", "p1_rows_00000001-00000002.npz"]


def test_evaluate_2x4_resumes_every_process_from_their_common_position(evaluations, tmp_path):
  _, done, _ = evaluations
  work = tmp_path / "work"
  shutil.copytree(done, work)
  first = json.loads((work / "metrics.json").read_text())
  (work / "metrics.json").unlink()
  state = work / "eval_state"
  # Process 1 lost its newest state (position 2): both must go back to position 1, process 0
  # dropping its own position 2, and redo batch 1 only.
  shutil.rmtree(state / "p1" / "2")
  kept = {p: stat(state / f"p{p}_rows_00000000-00000001.npz") for p in (0, 1)}
  redone = {p: stat(state / f"p{p}_rows_00000001-00000002.npz") for p in (0, 1)}
  time.sleep(0.01)
  code, out = launch("dualtoken_jax.evaluate", *eval_flags(work))
  assert code == 0, out[-3000:]
  assert_same_metrics(comparable(first), comparable(json.loads((work / "metrics.json").read_text())))
  for p in (0, 1):
    assert stat(state / f"p{p}_rows_00000000-00000001.npz") == kept[p]  # not re-evaluated
    assert stat(state / f"p{p}_rows_00000001-00000002.npz") != redone[p]  # batch 1 was
    assert sorted(os.listdir(state / f"p{p}")) == ["1", "2"]


# ---------------------------------------------------------------- tokenize
def tokenize_flags(out_dir, *extra, inputs=("sample",)):
  return [*inputs, *SOURCE, "--output_dir", str(out_dir), "--format", "array_record", *extra]


def records_by_key(directory):
  records = list(code_shards.read(directory))
  keys = [r["key"] for r in records]
  assert len(keys) == len(set(keys)), "a key in two shards"
  return {r["key"]: r for r in records}


def part_keys(directory, host):
  """The keys of the shards host `host` listed in its manifest part, shard by shard."""
  part = json.loads((directory / f"manifest-h{host:05d}.json").read_text())
  return {e["file"]: json.loads((directory / (e["file"] + ".keys.json")).read_text())
          for e in part["shards"]}


def assert_same_codes(got, want):
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k]["pixel"], want[k]["pixel"], err_msg=k)
    np.testing.assert_array_equal(got[k]["semantic"], want[k]["semantic"], err_msg=k)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """40 images (the 10 bundled photos, 4 copies each under other names): 20 per host."""
  root = tmp_path_factory.mktemp("photos")
  for i, (key, path) in enumerate(sorted(sample_photos.sample_photo_paths().items())):
    for copy in range(4):
      shutil.copy(path, root / f"c{copy}_{i:02d}{Path(path).suffix}")
  return root


@pytest.fixture(scope="module")
def reference_codes(photos, tmp_path_factory):
  """One process (this one, 8 devices) over the photos and the bundled samples."""
  out = tmp_path_factory.mktemp("tok_1")
  assert tokenize.main(tokenize_flags(out, "--shard_size", "7", "--batch_size", "8",
                                      inputs=("sample", str(photos)))) == 0
  return records_by_key(out)


def test_tokenize_2_processes_union_is_every_key_once_with_the_codes_of_1(
    reference_codes, tmp_path):
  out = tmp_path / "codes"
  code, log = launch("dualtoken_jax.tokenize",
                     *tokenize_flags(out, "--shard_size", "2", "--batch_size", "4"))
  assert code == 0, log[-3000:]
  got = records_by_key(out)
  samples = list(sample_photos.sample_photo_paths())  # the order of the inputs
  assert sorted(got) == sorted(samples)
  assert_same_codes(got, {k: reference_codes[k] for k in samples})
  # Host p wrote its own shards, listed in its own part, holding inputs p, p+2, ...
  for host in (0, 1):
    shards = part_keys(out, host)
    assert all(re.fullmatch(rf"codes-h{host:05d}-\d{{5}}\.array_record", f) for f in shards)
    assert sum(shards.values(), []) == samples[host::2]
  assert not (out / "manifest.json").exists()
  assert re.search(r"\[p1\] wrote 5 codes to 3 new shard\(s\)", log), log[-2000:]


def test_tokenize_kill_9_of_one_process_then_a_rerun_finishes_without_reencoding(
    photos, reference_codes, tmp_path, capsys):
  out = tmp_path / "codes"
  job = launcher("dualtoken_jax.tokenize", *tokenize_flags(
      out, "--shard_size", "1", "--batch_size", "1", inputs=(str(photos),)))
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)
  reader.start()
  pids, deadline = {}, time.monotonic() + 300
  part = out / "manifest-h00001.json"
  while not (part.is_file() and json.loads(part.read_text())["shards"]):
    assert job.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
    time.sleep(0.02)
  for m in (re.match(r"\[launch\] process (\d+): pid (\d+)", l) for l in list(lines)):
    if m:
      pids[int(m.group(1))] = int(m.group(2))
  os.kill(pids[1], signal.SIGSTOP)  # freeze it where it is, then kill -9 it there
  os.kill(pids[1], signal.SIGKILL)
  job.wait(timeout=HEARTBEAT + 120)
  reader.join(timeout=10)
  assert job.returncode != 0

  complete = {h: part_keys(out, h) for h in (0, 1) if (out / f"manifest-h{h:05d}.json").exists()}
  finished = {f: keys for shards in complete.values() for f, keys in shards.items()}
  done = sum(finished.values(), [])
  assert 1 <= len(complete[1]) < 20, "process 1 was killed after its first shard, before its last"
  assert len(done) == len(set(done))
  before = {f: stat(out / f) for f in finished}

  # A rerun with another process count (this one) encodes only what is missing.
  time.sleep(0.01)
  capsys.readouterr()
  assert tokenize.main(tokenize_flags(out, "--shard_size", "16", "--batch_size", "8",
                                      inputs=(str(photos),))) == 0
  printed = capsys.readouterr().out
  assert f"resuming: {len(done)} of 40 input(s)" in printed
  assert f"wrote {40 - len(done)} codes" in printed
  got = records_by_key(out)  # every key once
  assert_same_codes(got, {k: v for k, v in reference_codes.items() if k.startswith(str(photos))})
  assert {f: stat(out / f) for f in finished} == before  # complete shards untouched
  for h, shards in complete.items():  # and still listed as they were
    assert part_keys(out, h) == shards


def test_host_writers_share_a_directory_without_touching_each_other(tmp_path):
  """The per-host manifest parts in one process (no jax): what each kind of re-run may touch."""
  d = tmp_path / "codes"
  z = np.zeros((1, 1, 1))
  w0 = code_shards.ShardWriter(d, 2, host=0, hosts=2)
  w1 = code_shards.ShardWriter(d, 2, host=1, hosts=2, clean_others=False)
  for k in ("k0", "k2", "k4"):
    w0.write(k, z, z)
  for k in ("k1", "k3", "k5"):  # k5 stays in host 1's unfinished shard
    w1.write(k, z, z)
  w0.close()
  in_progress = sorted(d.glob("codes-h00001-*.array_record.tmp"))
  assert len(in_progress) == 1
  # Host 0 re-opening while host 1 still writes: host 1's keys are done, its files untouched.
  again = code_shards.ShardWriter(d, 2, host=0, hosts=2)
  assert again.done_keys == {"k0", "k1", "k2", "k3", "k4"}
  assert in_progress[0].exists()
  with pytest.raises(ValueError, match="'k3' is already in a shard"):
    again.write("k3", z, z)
  w1.close()
  assert sorted(records_by_key(d)) == [f"k{i}" for i in range(6)]
  assert sorted(p.name for p in d.glob("manifest*.json")) == ["manifest-h00000.json",
                                                               "manifest-h00001.json"]
  # A shard host 1 renamed but was killed before listing: readers refuse it, naming it; a
  # 1-host rerun (host 1 is not in that job) removes it, and so does the single writer.
  stray = d / "codes-h00001-00009.array_record"
  shutil.copy(d / "codes-h00001-00000.array_record", stray)
  with pytest.raises(code_shards.ShardDirectoryError, match="codes-h00001-00009.array_record"):
    code_shards.shard_files(d)
  code_shards.ShardWriter(d, 2, host=0, hosts=2)  # host 1 is in this job: not host 0's to clear
  assert stray.exists()
  single = code_shards.ShardWriter(d, 2)
  assert not stray.exists() and single.done_keys == {f"k{i}" for i in range(6)}
  single.write("k6", z, z)
  single.close()
  assert sorted(records_by_key(d)) == [f"k{i}" for i in range(7)]
  # --overwrite by one host of a running job clears only that host's files.
  code_shards.ShardWriter(d, 2, host=1, hosts=2, clean_others=False, overwrite=True)
  assert sorted(records_by_key(d)) == ["k0", "k2", "k4", "k6"]


def test_eval_state_drops_positions_the_other_hosts_did_not_reach(tmp_path):
  """`discard_after` (what a host that got further does on resume) and an older version's
  array layout refused with a clear error (in one process)."""
  from dualtoken_jax.evaluation import state  # pylint: disable=g-import-not-at-top
  from dualtoken_jax.metrics import fid  # pylint: disable=g-import-not-at-top
  work = str(tmp_path)
  acc = state.Accumulators(fid_real=fid.GaussianStats.from_features(np.eye(3) / 3))
  for position in (1, 2):
    acc.position = position
    state.save(acc, work, 0, {"run": 1})
  assert state.discard_after(work, 0, 1) == [2]
  assert state.saved_positions(work, 0) == [1]
  acc.position = 2
  state.save(acc, work, 0, {"run": 1})  # position 2 saved anew (Orbax refuses to overwrite)
  back = state.load(work, 0, 2, {"run": 1})
  np.testing.assert_array_equal(back.fid_real.outer, acc.fid_real.outer)  # float64, exact
  assert state.discard_after(work, 0, None) == [1, 2] and state.saved_positions(work, 0) == []
  acc.position = 3
  state.save(acc, work, 0, {"run": 1})
  os.unlink(os.path.join(state.state_dir(work), "p0", "3", "arrays", "arrays.npz"))
  with pytest.raises(state.FingerprintMismatch, match="older version.*new --workdir"):
    state.load(work, 0, 3, {"run": 1})


def test_tokenize_refuses_npz_output_with_several_processes(tmp_path, monkeypatch, capsys):
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # as in a launched job, before any work
  with pytest.raises(SystemExit) as exit_:
    tokenize.main(["sample", *SOURCE, "--output", str(tmp_path / "codes.npz")])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert "an .npz is one file written by one process" in err and "--format array_record" in err
  assert not (tmp_path / "codes.npz").exists()
