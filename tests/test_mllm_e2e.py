"""End to end: a tiny MLLM trained on codes pre-computed by the tokenize CLI learns to name the
bundled photos, judged on a question phrasing it never saw against the best image-blind
answer; the chat CLI, which runs the tokenizer on the image files itself, answers with it;
train_mllm resumes from a checkpoint bit-exactly."""

import contextlib
import io
import math

import jax
import numpy as np
import pytest

from jsonl import read_jsonl
import mllm_testdata as T
from dualtoken_jax import chat, config_files, tokenize
from dualtoken_jax.mllm.inference import UnifiedModel
from dualtoken_jax.mllm.train import train_and_evaluate
from dualtoken_jax.training import checkpoints

STEPS = 60


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("mllm_data")
  codes = tmp / "codes.npz"
  assert tokenize.main(["--checkpoint", T.tokenizer_dir(), *T.photos().values(),
                        "--output", str(codes)]) == 0
  return dict(
      spm=str(T.train_spm(tmp / "t.model", T.corpus())),
      train=str(T.write_json(tmp / "train.json", T.photo_conversations(T.TRAIN_QUESTIONS))),
      held_out=str(T.write_json(tmp / "held_out.json",
                                T.photo_conversations([T.HELD_OUT_QUESTION]))),
      captions=str(T.write_json(tmp / "captions.json", T.photo_captions())),
      codes=str(codes))


def config(files, **overrides):
  c = config_files.load("mllm_tiny")
  c.init.tokenizer = T.tokenizer_dir()
  c.text.spm_model = files["spm"]
  c.data.train = files["train"]
  c.data.codes = files["codes"]
  c.total_steps = STEPS
  for k, v in overrides.items():
    target, _, leaf = k.rpartition(".")
    (c[target] if target else c)[leaf] = v
  return c


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mllm_run")
  result = train_and_evaluate(config(files, **{
      "eval.data": files["held_out"], "eval.every_steps": 30,
      "checkpoint.every_steps": STEPS}), workdir)
  return workdir, result


def test_learns_to_answer_a_held_out_phrasing_far_below_chance(trained):
  workdir, result = trained
  chance = math.log(len(T.ANSWERS))  # the best image-blind answer NLL: uniform over answers
  evals = [m for m in read_jsonl(workdir / "metrics.jsonl") if "eval/answer_nll" in m]
  assert [m["step"] for m in evals] == [0, 30, STEPS]
  assert evals[0]["eval/answer_nll"] > chance          # untrained
  assert result["step"] == STEPS and result["samples"] == len(T.ANSWERS)
  assert result["answer_nll"] < 0.1 * chance, result    # it reads the image
  assert result["exact_match"] >= 0.9, result
  train = [m for m in read_jsonl(workdir / "metrics.jsonl") if "loss" in m]
  assert train[-1]["loss"] < 0.05 * train[0]["loss"]
  assert train[-1]["data/skipped_decode_error"] == 0 and "data/skipped_too_long" in train[-1]


def test_chat_cli_answers_with_the_trained_model(trained):
  workdir, _ = trained
  for key in ("skimage/chelsea.png", "skimage/rocket.jpg", "sklearn/flower.jpg"):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      code = chat.main(["--checkpoint", str(workdir), "--image", T.photos()[key],
                        "--prompt", T.HELD_OUT_QUESTION, "--max_new_tokens", "8"])
    assert code == 0 and out.getvalue().strip() == T.ANSWERS[key]
  model = UnifiedModel.from_checkpoint(workdir)
  photo = T.photos()["skimage/coffee.png"]
  sample = lambda seed: model.answer(T.HELD_OUT_QUESTION, photo, temperature=1.0, top_k=5,
                                     top_p=0.9, seed=seed, max_new_tokens=8)
  assert sample(3) == sample(3)  # seeded sampling is reproducible
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    assert chat.main(["--checkpoint", str(workdir / "nothing"), "--prompt", "hi"]) == 1
  assert "no training checkpoint" in err.getvalue()


def test_train_mllm_resumes_exactly_from_a_checkpoint(files, trained, tmp_path):
  straight, _ = trained
  c = lambda stop: config(files, stop_at_step=stop, log_every_steps=1)
  train_and_evaluate(c(STEPS // 2), tmp_path)
  train_and_evaluate(c(STEPS), tmp_path)  # picks up at step STEPS // 2
  steps = [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in m]
  assert steps == list(range(1, STEPS + 1))  # the second run did the second half only
  a, b = _restore(straight), _restore(tmp_path)
  for name in ("params", "opt_state", "step", "rng"):
    for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name])):
      np.testing.assert_array_equal(x, y, err_msg=name)


def _restore(workdir, step=STEPS):
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", every_steps=1, keep=5)
  restored = ckpt.manager.restore(step, args=checkpoints.ocp.args.Composite(
      state=checkpoints.ocp.args.StandardRestore()))
  ckpt.close()
  assert checkpoints.latest_step_dir(workdir).name == str(step)
  return restored["state"]


def test_generation_stage_continues_from_the_understanding_run(files, trained, tmp_path):
  """Stage 3 starts from the SFT run's checkpoint (`init.mllm`) on caption data with
  pre-computed codes: the heads train, the LLM and the understanding projector stay bitwise
  what the SFT run left."""
  sft_dir, _ = trained
  c = config_files.load("mllm_tiny:stage=generation")
  c.init.mllm = str(sft_dir)
  c.text.spm_model = files["spm"]
  c.data.captions = files["captions"]
  c.data.codes = files["codes"]
  c.total_steps, c.log_every_steps = 4, 1
  c.optimizer.warmup_steps = 1  # a warm-up longer than the run is refused
  train_and_evaluate(c, tmp_path)
  metrics = [m for m in read_jsonl(tmp_path / "metrics.jsonl") if "image_loss" in m]
  assert len(metrics) == 4 and metrics[0]["answer_tokens"] > 0 and metrics[-1]["finite"] == 1
  before, after = _restore(sft_dir)["params"], _restore(tmp_path, 4)["params"]
  for part in ("llm", "projector", "gen_pixel"):
    same = [np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before[part]),
                                                 jax.tree.leaves(after[part]))]
    assert all(same) if part != "gen_pixel" else not any(same), part
