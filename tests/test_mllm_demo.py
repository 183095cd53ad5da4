"""The MLLM demo end to end (configs/demo_mllm_cpu.py:test, shortened): one command builds the data,
trains understanding and generation jointly, and reports accuracies far above chance; the
generate CLI then writes images and codes from the trained model."""

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from jsonl import read_jsonl
from dualtoken_jax import config_files, generate
from dualtoken_jax.mllm.train import train_and_evaluate

STEPS = 100


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mllm_demo")
  config = config_files.load(f"demo_mllm_cpu:steps={STEPS},test")
  result = train_and_evaluate(config, workdir)
  return workdir, result


def test_demo_learns_both_directions_far_above_chance(demo_run):
  workdir, result = demo_run
  report = json.loads((workdir / "demo_report.json").read_text())
  assert report == result["demo"]
  assert report["chance"] == pytest.approx(0.1) and report["photos"] == 10
  assert report["understanding_accuracy"] >= 0.9, report
  assert report["generation_accuracy"] >= 0.8, report
  sheet = Image.open(workdir / "demo_generations.png")
  assert sheet.size[1] > 10 * 32  # one row per caption
  metrics = [m for m in read_jsonl(workdir / "metrics.jsonl") if "image_loss" in m]
  assert metrics[-1]["image_loss"] < 0.2 * metrics[0]["image_loss"]  # the heads learned
  assert metrics[-1]["pixel_code_accuracy"] > 0.9


def test_generate_cli_writes_images_and_codes(demo_run, tmp_path):
  workdir, _ = demo_run
  run = lambda *extra: generate.main(["--checkpoint", str(workdir), "--prompt",
                                      "a photo of a cat", "--out", str(tmp_path / "cat.png"),
                                      *extra])
  with contextlib.redirect_stdout(io.StringIO()):
    assert run("--n", "2", "--seed", "4") == 0
    first = np.load(tmp_path / "cat_codes.npz")["pixel"]
    assert run("--n", "2", "--seed", "4") == 0
  images = [np.asarray(Image.open(tmp_path / f"cat_{i}.png")) for i in range(2)]
  assert images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8
  codes = np.load(tmp_path / "cat_codes.npz")
  assert codes["pixel"].shape == (2, 4, 4, 4) and codes["semantic"].shape == (2, 4, 4, 4)
  np.testing.assert_array_equal(codes["pixel"], first)  # seeded
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    assert generate.main(["--checkpoint", str(tmp_path / "none"), "--prompt", "x",
                          "--out", str(tmp_path / "x.png")]) == 1
  assert "no training checkpoint" in err.getvalue()
