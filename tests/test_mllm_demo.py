"""The MLLM demo end to end (configs/demo_mllm_cpu.py:test, shortened): one command builds the data,
trains understanding and generation jointly, and reports accuracies far above chance; the
generate CLI then writes images and codes from the trained model."""

import contextlib
import io
import json
import shutil

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


# ---------------------------------------------------------------- benchmarks (mllm_eval)
YES_NO = "Is there {} in the image?"


def _benchmark_sets(root):
  """Small benchmark sets made from the bundled photos, in the benchmarks' own layouts: POPE
  (LLaVA's question file + a COCO label file) and MME (its subtask folder) asking "Is there X
  in the image?" for every photo and object name, and a SEED-style multiple-choice set asking
  the held-out question with four options per photo."""
  from dualtoken_jax.mllm import demo
  photos, keys = demo.photos(), list(demo.photos())
  pope, mme = root / "pope", root / "MME" / "existence"
  (pope / "val2014").mkdir(parents=True)
  mme.mkdir(parents=True)
  labels, questions = [], []
  for i, key in enumerate(keys):
    name = f"{i:04d}.png"
    shutil.copy(photos[key], pope / "val2014" / name)
    shutil.copy(photos[key], mme / name)
    for other in keys:
      question, answer = YES_NO.format(demo.ANSWERS[other]), "yes" if other == key else "no"
      n = len(labels)
      labels.append({"question_id": n, "image": name, "text": question, "label": answer})
      questions.append({"question_id": n, "image": name, "category": "random",
                        "text": question + "\nAnswer the question using a single word or phrase."})
      if other in (key, keys[(i + 1) % len(keys)]):  # MME: two questions per image, Yes and No
        with (mme / f"{i:04d}.txt").open("a") as f:
          f.write(f"{question}\t{answer.capitalize()}\n")
  (pope / "coco_pope_random.json").write_text("".join(json.dumps(l) + "\n" for l in labels))
  (pope / "llava_pope_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
  seed_images = root / "SEED-Bench-image"
  seed_images.mkdir()
  items = []
  for i, key in enumerate(keys):
    others = [demo.ANSWERS[keys[(i + k) % len(keys)]] for k in (1, 2, 3)]
    right = i % 4
    options = others[:right] + [demo.ANSWERS[key]] + others[right:]
    shutil.copy(photos[key], seed_images / f"{i}.png")
    items.append(dict(question_id=str(i), question=demo.HELD_OUT_QUESTION, data_id=f"{i}.png",
                      data_type="image", question_type_id=1, answer="ABCD"[right],
                      **{f"choice_{l}": t for l, t in zip("abcd", options)}))
  (root / "SEED-Bench.json").write_text(json.dumps(
      {"questions": items, "question_type": {"Instances Identity": 1}}))
  return {"pope": pope, "mme": root / "MME", "seed": root / "SEED-Bench.json",
          "pope_labels": [l["label"] for l in labels]}


@pytest.fixture(scope="module")
def demo_benchmarks(demo_run, tmp_path_factory):
  from dualtoken_jax.mllm.inference import UnifiedModel
  workdir, _ = demo_run
  return UnifiedModel.from_checkpoint(workdir), _benchmark_sets(tmp_path_factory.mktemp("bench"))


def test_batched_answers_and_loglikelihood_match_one_by_one(demo_benchmarks):
  from dualtoken_jax.mllm import demo
  model, _ = demo_benchmarks
  photos = list(demo.photos().values())
  requests = [(demo.HELD_OUT_QUESTION, p) for p in photos[:4]]
  requests += [(YES_NO.format("a cat"), photos[1]), ("What do you see?", None)]
  batched = model.answer_batch([q for q, _ in requests], [i for _, i in requests],
                               max_new_tokens=12, batch_size=8)
  assert batched == [model.answer(q, i, max_new_tokens=12) for q, i in requests]
  assert batched[:4] == [demo.ANSWERS[k] for k in list(demo.photos())[:4]]
  answered = [(q, i, a) for (q, i), a in zip(requests, batched) if a]  # text-only may be ""
  scored = model.loglikelihood_batch(answered, batch_size=8)
  assert len(scored) >= 5
  assert all(greedy for _, greedy in scored)  # the greedy answer is the argmax, teacher-forced
  one = model.loglikelihood(requests[0][0], requests[0][1], batched[0])
  assert one == pytest.approx(scored[0][0], abs=1e-4)
  assert model.loglikelihood(requests[0][0], requests[0][1], "a rocket") < one - 1.0


def test_benchmarks_on_the_demo_and_resume_after_a_kill(demo_run, demo_benchmarks, tmp_path):
  from dualtoken_jax import evaluate_mllm
  from dualtoken_jax.mllm_eval import runner, scoring
  workdir, _ = demo_run
  model, data = demo_benchmarks
  quiet = dict(progress=False, out=io.StringIO(), style="plain", batch_size=16)
  # Multiple choice ranked by log-likelihood: far above chance (0.25) on the held-out question.
  seed = runner.evaluate(model, "seed", data["seed"], tmp_path / "seed", mode="loglikelihood",
                         **quiet)["metrics"]
  assert seed["accuracy"] >= 80, seed
  generated = runner.evaluate(model, "seed", data["seed"], tmp_path / "seed_gen",
                              **quiet)["metrics"]
  assert 0 <= generated["accuracy"] <= 100 and generated["count"] == 10
  # The demo never learns yes/no questions: it scores what its answers are (checked against
  # the labels written above, independently of the reader), whatever they are.
  pope = runner.evaluate(model, "pope", data["pope"], tmp_path / "pope", **quiet)
  rows = [json.loads(l) for l in (tmp_path / "pope" / "predictions.jsonl").read_text().splitlines()]
  assert [int(r["qid"]) for r in rows] == list(range(100)) and pope["answered"] == 100
  assert pope["metrics"]["random"] == scoring.pope([r["prediction"] for r in rows],
                                                   data["pope_labels"])
  mme = runner.evaluate(model, "mme", data["mme"], tmp_path / "mme", **quiet)["metrics"]
  assert mme["subtasks"]["existence"]["questions"] == 20
  assert mme["subtasks"]["existence"]["images"] == 10

  # The CLI, killed mid-write (a torn last line, later lines lost), resumed: no duplicates,
  # the same metrics as the uninterrupted run.
  run = lambda out: evaluate_mllm.main(
      ["--checkpoint", str(workdir), "--task", "seed", "--data", str(data["seed"]), "--mode",
       "loglikelihood", "--workdir", str(out), "--prompt_style", "plain", "--batch_size", "4",
       "--no_progress"])
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    assert run(tmp_path / "cli") == 0
  assert "10/10 answered" in printed.getvalue() and "accuracy" in printed.getvalue()
  fresh = json.loads((tmp_path / "cli" / "metrics.json").read_text())["metrics"]
  assert fresh == seed
  predictions = tmp_path / "cli" / "predictions.jsonl"
  lines = predictions.read_text().splitlines(keepends=True)
  predictions.write_text("".join(lines[:5]) + lines[5][:15])
  with contextlib.redirect_stdout(io.StringIO()):
    assert run(tmp_path / "cli") == 0
  qids = [json.loads(l)["qid"] for l in predictions.read_text().splitlines()]
  assert len(qids) == len(set(qids)) == 10
  assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["metrics"] == fresh
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    assert run(tmp_path / "cli") == 0  # everything done: nothing re-answered
    assert evaluate_mllm.main(["--checkpoint", str(workdir), "--task", "seed", "--data",
                               str(data["seed"]), "--workdir", str(tmp_path / "cli")]) == 1
  assert "other settings" in err.getvalue()  # generate mode into a loglikelihood workdir
