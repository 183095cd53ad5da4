"""MLLM training in a real multi-process job (`python -m dualtoken_jax.launch`, 2 processes x 4
CPU devices, fsdp and data axes both > 1) computes what one process with 8 devices does: each
host reads its block of every global batch (`pipeline.HostBlocks`), so the same conversations
land in the same rows. The tiny SFT model (`configs/mllm_tiny.py`) trains on pre-computed
codes, so no tokenizer runs inside the job."""

import jax
import numpy as np
import pytest

import launcher
import mllm_testdata as T
from dualtoken_jax import config_files, tokenize
from dualtoken_jax.mllm import state as S
from dualtoken_jax.mllm.train import train_and_evaluate

pytestmark = pytest.mark.slow

STEPS = 4
# lr: Adam moves an entry whose gradient is ~0 by ~lr·sign(rounding noise), and the all-reduce
# order differs across process counts; the moments carry the data's gradients at full size.
OVERRIDES = {"total_steps": STEPS, "optimizer.warmup_steps": 1, "optimizer.lr": 1e-6,
             "mesh.data": 2, "log_every_steps": 1, "eval.every_steps": 1000,
             "checkpoint.every_steps": STEPS}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("mllm_mp_data")
  codes = tmp / "codes.npz"
  assert tokenize.main(["--checkpoint", T.tokenizer_dir(), *T.photos().values(),
                        "--output", str(codes)]) == 0
  return {"init.tokenizer": T.tokenizer_dir(),
          "text.spm_model": str(T.train_spm(tmp / "t.model", T.corpus())),
          "data.train": str(T.write_json(tmp / "train.json",
                                         T.photo_conversations(T.TRAIN_QUESTIONS))),
          "data.codes": str(codes)}


def config(files):
  c = config_files.load("mllm_tiny")
  for k, v in {**files, **OVERRIDES}.items():
    target, _, leaf = k.rpartition(".")
    (c[target] if target else c)[leaf] = v
  return c


def restore(workdir, files):
  return launcher.restore(workdir, S.Modules(config(files)), STEPS)


def test_two_processes_train_the_mllm_as_one_with_eight_devices(files, tmp_path):
  two, one = tmp_path / "two", tmp_path / "one"
  flags = [f"--config.{k}={v}" for k, v in {**files, **OVERRIDES}.items()]
  code, out = launcher.run(["dualtoken_jax.train_mllm", "--config=configs/mllm_tiny.py",
                            f"--workdir={two}", *flags])
  assert code == 0, out[-3000:]
  assert "2 process(es)" in out, out[-3000:]
  train_and_evaluate(config(files), one)
  a, b = restore(two, files), restore(one, files)
  assert int(a.step) == int(b.step) == STEPS
  leaves = list(zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
  assert leaves
  for x, y in leaves:
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  x, y = (np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(s.opt_state)])
          for s in (a, b))
  # A different record in any row moves the moments by O(1) of their norm.
  assert np.linalg.norm(y) > 0 and np.linalg.norm(x - y) <= 1e-4 * np.linalg.norm(y)
