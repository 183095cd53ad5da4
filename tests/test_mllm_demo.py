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


# ---------------------------------------------------------------- generation benchmarks
MJHQ = {"people": ("skimage/astronaut.png", "matplotlib/grace_hopper.jpg"),
        "things": ("skimage/rocket.jpg", "skimage/coffee.png")}


@pytest.fixture(scope="module")
def demo_with_text_tower(demo_benchmarks):
  """The demo model whose frozen tokenizer also has a (random) SigLIP text tower: the demo
  tokenizer is built without one, and the alignment score needs it."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import ml_collections
  from dualtoken_jax.mllm.inference import UnifiedModel
  from dualtoken_jax.models import config as mc
  from dualtoken_jax.models.text import TextTower
  model, _ = demo_benchmarks
  config = ml_collections.ConfigDict(model.config.to_dict())
  tok = config.model.tokenizer
  tok.text = t = mc.text_config(width=32, depth=1, mlp_dim=64, num_heads=2, vocab_size=128,
                                max_len=16, out_dim=tok.vision.width)
  tower = TextTower(vocab_size=t.vocab_size, max_len=t.max_len, width=t.width, depth=t.depth,
                    mlp_dim=t.mlp_dim, num_heads=t.num_heads, out_dim=t.out_dim,
                    scan=tok.scan_layers)
  txt = nn.meta.unbox(jax.jit(tower.init)(jax.random.key(7), jnp.zeros((1, 16), jnp.int32)))
  txt = txt["params"]
  variables = dict(model.tokenizer_variables)
  variables["params"] = dict(variables["params"], txt=txt)
  return UnifiedModel(config, model.params, variables, model.vocab)


def _mjhq_set(root):
  """A tiny MJHQ-30K in its layout: meta_data.json (2 categories x 2 prompts, the demo's
  captions, and one record without a prompt) and the photos as mjhq30k_imgs/<cat>/<id>.jpg."""
  from dualtoken_jax.mllm import demo
  photos = demo.photos()
  meta = {}
  for category, keys in MJHQ.items():
    (root / "mjhq30k_imgs" / category).mkdir(parents=True)
    for key in keys:
      pid = key.split("/")[1].split(".")[0]
      meta[pid] = {"category": category, "prompt": demo.REPORT_CAPTION.format(demo.ANSWERS[key])}
      Image.open(photos[key]).convert("RGB").save(root / "mjhq30k_imgs" / category / f"{pid}.jpg")
  meta["broken"] = {"category": "things"}
  (root / "meta_data.json").write_text(json.dumps(meta))
  return root / "meta_data.json"


def test_mjhq_fid_and_alignment_on_the_demo(demo_run, demo_with_text_tower, tmp_path):
  import math
  from test_evaluate_e2e import write_random_inception
  from dualtoken_jax.mllm import text_tokenizers
  from dualtoken_jax.mllm_eval import generation_runner as R
  workdir, _ = demo_run
  model = demo_with_text_tower
  meta = _mjhq_set(tmp_path)
  write_random_inception(tmp_path / "inception.npz")
  spm = text_tokenizers.workdir_file(workdir)  # any SentencePiece with an EOS serves here
  printed = io.StringIO()
  result = R.evaluate(model, "mjhq", meta, tmp_path / "w", batch_size=4, seed=1,
                      inception_weights_path=tmp_path / "inception.npz", siglip_tokenizer=spm,
                      progress=False, out=printed)
  assert result["generated_this_run"] == 4 and result["images"] == 4
  assert result["skipped"] == {"bad_record": 1}
  images = tmp_path / "w" / "images"
  assert sorted(str(f.relative_to(images)) for f in images.rglob("*") if f.is_file()) == [
      "people/astronaut.png", "people/grace_hopper.png", "things/coffee.png", "things/rocket.png"]
  m = result["metrics"]
  assert math.isfinite(m["fid"]) and m["fid"] > 0
  for category in MJHQ:
    entry = m["by_category"][category]
    assert math.isfinite(entry["fid"]) and entry["generated"] == entry["reference"] == 2
  assert "fid" in printed.getvalue() and "alignment (siglip)" in printed.getvalue()
  assert json.loads((tmp_path / "w" / "metrics.json").read_text())["metrics"] == json.loads(
      json.dumps(m))

  # The alignment score by hand on the same towers' embeddings (text tower on SigLIP's tokens,
  # both image paths on the written PNGs): cosine, exp(t) * cosine + b, sigmoid, means.
  order = [(c, k.split("/")[1].split(".")[0]) for c, keys in MJHQ.items() for k in keys]
  prompts = [json.loads(meta.read_text())[pid]["prompt"] for _, pid in order]
  towers = R.AlignmentTowers(model.tokenizer, model.tokenizer_variables, spm)
  t_emb = towers.texts(prompts)
  siglip, quantised = towers.images([np.asarray(Image.open(images / c / f"{pid}.png"))
                                     for c, pid in order])
  paths = {"siglip": siglip, "quantised": quantised}
  v = model.tokenizer_variables
  scale, bias = math.exp(float(v["params"]["t"][0])), float(v["params"]["b"][0])
  for name, i_emb in paths.items():
    cos = [float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
           for a, b in zip(t_emb, i_emb)]
    logits = [scale * c + bias for c in cos]
    got = m["alignment"][name]
    assert got["cosine"] == pytest.approx(np.mean(cos), abs=1e-4)
    assert got["pair_logit"] == pytest.approx(np.mean(logits), abs=1e-3)
    assert got["pair_probability"] == pytest.approx(
        np.mean([1 / (1 + math.exp(-l)) for l in logits]), abs=1e-5)
    assert got["by_group"]["people"]["cosine"] == pytest.approx(np.mean(cos[:2]), abs=1e-4)
  assert m["alignment"]["pairs"] == 4


def test_geneval_layout_and_resume_after_a_kill(demo_with_text_tower, tmp_path, monkeypatch):
  from dualtoken_jax.mllm_eval import generation_runner as R
  model = demo_with_text_tower
  lines = [{"tag": "single_object", "include": [{"class": n, "count": 1}],
            "prompt": f"a photo of {a}"} for n, a in (("cat", "a cat"), ("rocket", "a rocket"),
                                                      ("flower", "a flower"))]
  data = tmp_path / "evaluation_metadata.jsonl"
  data.write_text("".join(json.dumps(l) + "\n" for l in lines))
  calls, draw = [], model.generate_images_batch
  monkeypatch.setattr(model, "generate_images_batch",
                      lambda captions, **kw: calls.append(kw["stream"]) or draw(captions, **kw))
  run = lambda **kw: R.evaluate(model, "geneval", data, tmp_path / "g", samples_per_prompt=2,
                                batch_size=4, alignment_score=False, progress=False,
                                out=io.StringIO(), **kw)
  first = run()
  # 6 samples in fixed batches of 4: [p0 p0 p1 p1] [p2 p2]
  assert calls == [0, 1] and first["generated_this_run"] == 3 and first["images"] == 6
  assert "evaluate_images.py" in first["official_scorer"]
  out = tmp_path / "g" / "images"
  files = lambda: sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
  assert files() == [f"{n:05d}/{f}" for n in range(3)
                     for f in ("metadata.jsonl", "samples/0000.png", "samples/0001.png")]
  for n, line in enumerate(lines):
    with open(out / f"{n:05d}" / "metadata.jsonl") as f:
      assert json.load(f) == line  # as GenEval's evaluate_images.py reads it
  assert np.asarray(Image.open(out / "00001" / "samples" / "0001.png")).shape == (32, 32, 3)
  snapshot = {f: (out / f).read_bytes() for f in files()}
  stamp = lambda f: (out / f).stat().st_mtime_ns
  kept = {f: stamp(f) for f in files()}

  # Killed after two prompts: the third prompt's folder holds one sample and a torn temporary.
  for f in ("00002/metadata.jsonl", "00002/samples/0001.png"):
    (out / f).unlink()
  (out / "00002" / "samples" / ".0001.png.999.tmp").write_bytes(b"\x89PNG")
  calls.clear()
  assert run()["generated_this_run"] == 1 and calls == [1]  # only the second batch is drawn
  # Killed inside the first batch (the second prompt lacks a sample): that batch alone again.
  (out / "00001" / "samples" / "0000.png").unlink()
  calls.clear()
  again = run()
  assert again["generated_this_run"] == 1 and calls == [0]
  assert {f: (out / f).read_bytes() for f in snapshot} == snapshot  # the same images
  assert all(stamp(f) == kept[f] for f in kept if f.startswith("00000"))  # not rewritten
  assert again["metrics"] == first["metrics"] == {}
  with pytest.raises(ValueError, match="other settings"):
    run(seed=2)


def test_generation_cli_refuses_a_tokenizer_without_text_tower(demo_run, tmp_path):
  from dualtoken_jax import evaluate_mllm
  workdir, _ = demo_run
  data = tmp_path / "evaluation_metadata.jsonl"
  data.write_text(json.dumps({"tag": "single_object", "prompt": "a photo of a cat"}) + "\n")
  run = lambda *extra: evaluate_mllm.main(
      ["--checkpoint", str(workdir), "--task", "geneval", "--data", str(data), "--workdir",
       str(tmp_path / "g"), "--no_progress", *extra])
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    assert run("--siglip_tokenizer", str(tmp_path / "none.model")) == 1
  assert "text tower" in err.getvalue() and "--no_alignment" in err.getvalue()
  assert not (tmp_path / "g" / "images").exists()  # refused before anything was drawn


# ---------------------------------------------------------------- lmms-eval plugin
def _lmms_task(photos):
  """An lmms-eval task_dict ({task: {split: docs}}) over the first photos, each doc's image
  opened with PIL as a `datasets` row gives it, and a request builder for its args tuples."""
  docs = [{"image": Image.open(p), "path": p} for p in photos]
  task_dict = {"demo": {"test": docs}}
  visual = lambda doc: [doc["image"]]
  text_only = lambda doc: []
  return task_dict, visual, text_only


def test_lmms_adapter_answers_as_unified_model(demo_benchmarks):
  from dualtoken_jax.data.transforms import load_image
  from dualtoken_jax.mllm import demo
  from dualtoken_jax.mllm_eval.lmms_adapter import LmmsAdapter, stop_at
  model, _ = demo_benchmarks
  keys = list(demo.photos())
  photos = list(demo.photos().values())
  size = model.config.model.tokenizer.image_size
  task_dict, visual, text_only = _lmms_task(photos)
  adapter = LmmsAdapter(model, batch_size=8)
  greedy = {"max_new_tokens": 12, "temperature": 0, "until": ["\n\n"], "do_sample": False}
  # 10 photo requests (two batches of 8: order kept across them), one with lmms-eval's <image>
  # placeholder, one text-only; then the same photos with stop strings.
  requests = [(demo.HELD_OUT_QUESTION if i else f"<image>\n{demo.HELD_OUT_QUESTION}", greedy,
               visual, i, "demo", "test") for i in range(len(photos))]
  requests.append(("What do you see?", greedy, text_only, 0, "demo", "test"))
  expected = model.answer_batch([demo.HELD_OUT_QUESTION] * len(photos) + ["What do you see?"],
                                [load_image(p, size) for p in photos] + [None],
                                max_new_tokens=12, batch_size=8)
  assert expected[:len(photos)] == [demo.ANSWERS[k] for k in keys]  # the demo names its photos
  assert adapter.generate_until(requests, task_dict) == expected
  # Stop strings cut after generation, as lmms-eval's plugins cut: each non-empty one in turn.
  assert stop_at("a cup of coffee", ["", " of", "cup"]) == "a "
  assert stop_at("yes\n\nno", ["\n\n"]) == "yes" and stop_at("a cat", []) == "a cat"
  coffee, cat = keys.index("skimage/coffee.png"), keys.index("skimage/chelsea.png")
  cut = [(demo.HELD_OUT_QUESTION, {"max_new_tokens": 12, "until": ["of", " "]}, visual, i,
          "demo", "test") for i in (coffee, cat)]
  cut.append((demo.HELD_OUT_QUESTION, {"max_new_tokens": 12, "until": "cup"}, visual, coffee,
              "demo", "test"))
  assert adapter.generate_until(cut, task_dict) == ["a", "a", "a "]
  # A request with its own max_new_tokens is answered in its own group, in place.
  short = [(demo.HELD_OUT_QUESTION, {"max_new_tokens": 1}, visual, coffee, "demo", "test"),
           requests[1]]
  first = model.answer_batch([demo.HELD_OUT_QUESTION], [load_image(photos[coffee], size)],
                             max_new_tokens=1, batch_size=8)[0]
  assert adapter.generate_until(short, task_dict) == [first, expected[1]]
  assert len(model.vocab.encode(first)) <= 1 < len(model.vocab.encode(expected[coffee]))


def test_lmms_adapter_loglikelihood_and_failures(demo_benchmarks):
  import io as io_
  from dualtoken_jax.data.transforms import load_image
  from dualtoken_jax.mllm import demo
  from dualtoken_jax.mllm_eval.lmms_adapter import LmmsAdapter, lmms_score
  model, _ = demo_benchmarks
  keys = list(demo.photos())
  photos = list(demo.photos().values())
  size = model.config.model.tokenizer.image_size
  task_dict, visual, text_only = _lmms_task(photos)
  adapter = LmmsAdapter(model, batch_size=8)
  q = demo.HELD_OUT_QUESTION
  cat, rocket = keys.index("skimage/chelsea.png"), keys.index("skimage/rocket.jpg")
  # Multiple choice as lmms-eval builds it: f"{target_delimiter}{choice}" (the delimiter " " is
  # dropped: the model turn starts at a token boundary); doc_to_target may be a function.
  requests = [(q, " a cat", visual, cat, "demo", "test"),        # the right name: greedy
              (q, " a rocket", visual, cat, "demo", "test"),     # a wrong one
              (q, lambda doc: "a rocket", visual, rocket, "demo", "test"),
              ("What do you see?", "a cat")]                     # text only
  scores = adapter.loglikelihood(requests, task_dict)
  image = lambda i: load_image(photos[i], size)
  for (logp, _), (prompt, image_, cont) in zip(scores, [
      (q, image(cat), "a cat"), (q, image(cat), "a rocket"), (q, image(rocket), "a rocket"),
      ("What do you see?", None, "a cat")]):
    assert logp == pytest.approx(model.loglikelihood(prompt, image_, cont), abs=1e-4)
  assert [greedy for _, greedy in scores[:3]] == [True, False, True]
  assert scores[1][0] < scores[0][0] - 1.0
  # What the plugin hands lmms-eval: the negated log-likelihood, as its multiple-choice scoring
  # takes the argmin (of its models' losses); "logprob" keeps the sign.
  assert lmms_score((-2.5, True), "nll") == (2.5, True)
  assert lmms_score((-2.5, False), "logprob") == (-2.5, False)
  nll = [lmms_score(x, "nll")[0] for x in scores[:2]]
  assert int(np.argmin(nll)) == 0  # the right name
  with pytest.raises(ValueError, match="score"):
    lmms_score((-1.0, True), "loss")

  # A document whose image does not decode: answered "" / (-inf, False), skipped and counted.
  buf = io_.BytesIO()
  Image.open(photos[0]).convert("RGB").save(buf, "JPEG")  # cut in half: opens, does not load
  task_dict["demo"]["test"].append(
      {"image": Image.open(io_.BytesIO(buf.getvalue()[:len(buf.getvalue()) // 2]))})
  bad = len(task_dict["demo"]["test"]) - 1
  out = adapter.generate_until([(q, {"max_new_tokens": 12}, visual, bad, "demo", "test"),
                                (q, {"max_new_tokens": 12}, visual, cat, "demo", "test")],
                               task_dict)
  assert out == ["", "a cat"]
  assert adapter.loglikelihood([(q, "a cat", visual, bad, "demo", "test")], task_dict) == [
      (-float("inf"), False)]
  assert adapter.skipped == {"decode_error": 2} and "doc " in adapter.examples[0]
  # What the model cannot do is an error naming the request, not a wrong answer.
  two = lambda doc: [doc["image"], doc["image"]]
  with pytest.raises(ValueError, match="2 images"):
    adapter.generate_until([(q, {}, two, 0, "demo", "test")], task_dict)
  with pytest.raises(ValueError, match="beam"):
    adapter.generate_until([(q, {"num_beams": 4}, visual, 0, "demo", "test")], task_dict)
  with pytest.raises(ValueError, match="until"):
    adapter.generate_until([(q, {"until": 3}, visual, 0, "demo", "test")], task_dict)
  with pytest.raises(ValueError, match="video"):
    adapter.generate_until([(q, {}, lambda doc: ["clip.mp4"], 0, "demo", "test")], task_dict)


def test_lmms_eval_plugin_registered_and_answering(demo_run, demo_benchmarks):
  """Runs where lmms-eval is installed (`pip install -e .[lmms]`; not in CI)."""
  pytest.importorskip("lmms_eval")
  from lmms_eval.api import instance as lmms_instance
  from lmms_eval.api.instance import Instance
  from lmms_eval.models import get_model
  from dualtoken_jax.mllm import demo
  from dualtoken_jax.mllm_eval.lmms_plugin import DualTokenJax
  workdir, _ = demo_run
  assert get_model("dualtoken_jax") is DualTokenJax  # through the package's entry point
  plugin = DualTokenJax.create_from_arg_string(f"checkpoint={workdir},max_new_tokens=12",
                                               {"batch_size": 4, "device": "cpu"})
  photos = list(demo.photos().values())
  plugin.task_dict, visual, _ = _lmms_task(photos)
  make = lambda kind, args, i: Instance(request_type=kind, arguments=args, idx=0,
                                        metadata={"task": "demo", "doc_id": i, "repeats": 1})
  gen = [make("generate_until", (demo.HELD_OUT_QUESTION, {"until": ["\n\n"]}, visual, i, "demo",
                                 "test"), i) for i in range(5)]
  assert plugin.generate_until(gen) == [demo.ANSWERS[k] for k in list(demo.photos())[:5]]
  cat = list(demo.photos()).index("skimage/chelsea.png")
  ll = [make("loglikelihood", (demo.HELD_OUT_QUESTION, f" {name}", visual, cat, "demo", "test"),
             cat) for name in ("a rocket", "a cat", "a flower")]
  # What lmms-eval's evaluator hands the task (it unwraps every response) is the pair.
  unwrap = getattr(lmms_instance, "unwrap_generation_output", lambda x: (x, None))
  scores = [unwrap(x)[0] for x in plugin.loglikelihood(ll)]
  assert [g for _, g in scores] == [False, True, False]
  assert scores[1][0] == min(s for s, _ in scores) > 0  # NLL: lmms-eval's argmin picks "a cat"
  with pytest.raises(ValueError, match="unknown model_args"):
    DualTokenJax.create_from_arg_string(f"checkpoint={workdir},beams=2")
  with pytest.raises(NotImplementedError):
    plugin.generate_until_multi_round(gen)
