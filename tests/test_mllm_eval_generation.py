"""The generation benchmarks without a model: each prompt reader on small files in the real
layout (bad records skipped and counted), the folder layouts the official scorers read, and
the alignment maths against hand-worked numbers. (Generation, resume, FID and alignment on a
trained model: tests/test_mllm_demo.py.)"""

import json
import math

import numpy as np
import pytest
from PIL import Image

from dualtoken_jax.mllm_eval import generation_runner as R
from dualtoken_jax.mllm_eval import generation_tasks as G


def test_mjhq_reader(tmp_path):
  meta = {"a1f3": {"category": "animals", "prompt": " a cat on a sofa ", "clip_score": 0.3},
          "b2": {"category": "food", "prompt": "a bowl of ramen"},
          "c3": {"category": "food"},                              # no prompt
          "d4": {"category": "../up", "prompt": "escapes"},        # not a file name
          "e5": "not an object"}
  (tmp_path / "meta_data.json").write_text(json.dumps(meta))
  data = G.read_mjhq(tmp_path / "meta_data.json")
  assert [(p.pid, p.text, p.meta) for p in data.prompts] == [
      ("a1f3", "a cat on a sofa", {"category": "animals"}), ("b2", "a bowl of ramen",
                                                             {"category": "food"})]
  assert data.skipped["bad_record"] == 3
  (tmp_path / "list.json").write_text("[]")
  with pytest.raises(ValueError, match="MJHQ"):
    G.read_mjhq(tmp_path / "list.json")
  with pytest.raises(FileNotFoundError):
    G.read_mjhq(tmp_path / "none.json")


def test_geneval_reader_keeps_line_numbers(tmp_path):
  lines = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}],
            "prompt": "a photo of a bench"},
           "{not json",
           {"tag": "two_object", "prompt": ""},                   # empty prompt
           {"prompt": "no tag"},
           {"tag": "counting", "include": [{"class": "cat", "count": 2}],
            "prompt": "a photo of two cats"}]
  path = tmp_path / "evaluation_metadata.jsonl"
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
  data = G.read_geneval(path)
  assert [p.pid for p in data.prompts] == ["00000", "00004"]
  assert data.prompts[1].meta == {"metadata": lines[4], "tag": "counting"}
  assert data.skipped["bad_record"] == 3


def test_genai_bench_reader_both_forms(tmp_path):
  doc = {"00000": {"id": "00000", "prompt": "A baker pulling bread out of an oven.",
                   "basic_skills": ["Action"], "advanced_skills": []},
         "00001": {"id": "00001", "prompt": "Three dogs, none of them brown.",
                   "basic_skills": ["Attribute"], "advanced_skills": ["Counting", "Negation"]},
         "x": {"prompt": "id is not an index"}, "00003": {"prompt": None}}
  (tmp_path / "genai_image.json").write_text(json.dumps(doc))
  data = G.read_genai_bench(tmp_path / "genai_image.json")
  assert [p.pid for p in data.prompts] == ["00000", "00001"]
  assert data.prompts[1].meta["advanced_skills"] == ["Counting", "Negation"]
  assert data.skipped["bad_record"] == 2
  (tmp_path / "list.json").write_text(json.dumps([{"id": 7, "prompt": "a red cube"},
                                                   {"id": 7, "prompt": "duplicate"}]))
  data = G.read_genai_bench(tmp_path / "list.json")
  assert [(p.pid, p.text) for p in data.prompts] == [("00007", "a red cube")]
  assert data.skipped["bad_record"] == 1


def test_dpg_bench_reader(tmp_path):
  folder = tmp_path / "prompts"
  folder.mkdir()
  (folder / "partiprompts10.txt").write_text("A tall giraffe next to a short zebra.\n")
  (folder / "1.txt").write_text("A red cube on a blue sphere.")
  (folder / "empty.txt").write_text("  \n")
  (folder / "notes.md").write_text("ignored")
  data = G.read_dpg_bench(folder)
  assert [(p.pid, p.text) for p in data.prompts] == [
      ("1", "A red cube on a blue sphere."), ("partiprompts10",
                                              "A tall giraffe next to a short zebra.")]
  assert data.skipped["bad_record"] == 1
  with pytest.raises(FileNotFoundError, match="no <name>.txt"):
    G.read_dpg_bench(tmp_path)


def _images(n, size=8, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_layouts_are_what_the_official_scorers_read(tmp_path):
  line = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
          "prompt": "a photo of a red car"}
  p = G.Prompt("00012", line["prompt"], {"metadata": line, "tag": "colors"})
  images = _images(4)
  layout = G.LAYOUTS["geneval"]
  assert not G.complete(tmp_path, layout, p, 4)
  layout.write(tmp_path, p, images)
  assert sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*")) == [
      "00012", "00012/metadata.jsonl", "00012/samples", "00012/samples/0000.png",
      "00012/samples/0001.png", "00012/samples/0002.png", "00012/samples/0003.png"]
  with open(tmp_path / "00012" / "metadata.jsonl") as f:  # how evaluate_images.py reads it
    assert json.load(f) == line
  assert G.complete(tmp_path, layout, p, 4) and not G.complete(tmp_path, layout, p, 5)
  for a, b in zip(layout.read(tmp_path, p, 4), images):  # PNG: lossless
    np.testing.assert_array_equal(a, b)

  genai = tmp_path / "genai"
  G.LAYOUTS["genai_bench"].write(genai, G.Prompt("00003", "x", {}), images[:1])
  assert [f.name for f in genai.iterdir()] == ["00003.jpeg"]
  assert Image.open(genai / "00003.jpeg").format == "JPEG"

  mjhq = tmp_path / "mjhq"
  G.LAYOUTS["mjhq"].write(mjhq, G.Prompt("a1f3", "x", {"category": "food"}), images[:1])
  assert (mjhq / "food" / "a1f3.png").is_file()

  dpg = tmp_path / "dpg"
  G.LAYOUTS["dpg_bench"].write(dpg, G.Prompt("partiprompts10", "x", {}), images)
  grid = np.asarray(Image.open(dpg / "partiprompts10.png"))
  assert grid.shape == (16, 16, 3)
  # compute_dpg_bench.py's crops for --resolution 8 --pic-num 4, row-major 2x2
  for k, (left, top) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
    np.testing.assert_array_equal(grid[top:top + 8, left:left + 8], images[k])
  assert [f.name for f in dpg.iterdir()] == ["partiprompts10.png"]  # no temporary left


def test_samples_per_prompt_rules():
  assert G.check_samples(G.get("geneval"), None) == 4
  assert G.check_samples(G.get("geneval"), 2) == 2
  assert G.check_samples(G.get("mjhq"), None) == 1
  with pytest.raises(ValueError, match="1 image per prompt"):
    G.check_samples(G.get("genai_bench"), 4)
  with pytest.raises(ValueError, match="at most 4"):
    G.check_samples(G.get("dpg_bench"), 5)
  with pytest.raises(ValueError, match=">= 1"):
    G.check_samples(G.get("geneval"), 0)
  with pytest.raises(ValueError, match="unknown generation task"):
    G.get("pope")


def test_pair_scores_hand_worked():
  # text rows are normalised inside: (3, 4) -> (0.6, 0.8); image (1, 0) -> cosine 0.6;
  # second pair: (1, 1)/sqrt2 vs (0, -2) -> cosine -1/sqrt2.
  text = np.array([[3.0, 4.0], [1.0, 1.0]])
  image = np.array([[1.0, 0.0], [0.0, -2.0]])
  t, b = np.array([math.log(10.0)]), np.array([-10.0])
  s = R.pair_scores(text, image, t, b)
  np.testing.assert_allclose(s["cosine"], [0.6, -1 / math.sqrt(2)], rtol=1e-6)
  logits = [10 * 0.6 - 10, 10 * (-1 / math.sqrt(2)) - 10]
  np.testing.assert_allclose(s["pair_logit"], logits, rtol=1e-6)
  np.testing.assert_allclose(s["pair_probability"], [1 / (1 + math.exp(-l)) for l in logits],
                             rtol=1e-6)
  means = R.mean_scores(s)
  assert means["cosine"] == pytest.approx((0.6 - 1 / math.sqrt(2)) / 2, rel=1e-6)
  assert R.mean_scores(s, [1])["pair_logit"] == pytest.approx(logits[1], rel=1e-6)
  with pytest.raises(ValueError, match="equal"):
    R.pair_scores(text, image[:1], t, b)


def test_fid_from_features_is_exact_below_the_feature_dimension():
  from dualtoken_jax.metrics import fid
  rng = np.random.default_rng(3)
  x1, x2 = rng.normal(size=(3, 6)), rng.normal(size=(4, 6)) + 0.5
  s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
  # tr((S1 S2)^1/2) from the eigenvalues of S1 S2 (real, >= 0), independently of the code's
  # singular-value route
  trace_root = np.sum(np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)))
  want = np.sum((x1.mean(0) - x2.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_root
  assert fid.fid_from_features(x1, x2) == pytest.approx(want, rel=1e-6)  # eigvals: ~1e-8 noise
  assert fid.fid_from_features(x1, x2) == pytest.approx(
      fid.frechet_distance(x1.mean(0), s1, x2.mean(0), s2), abs=1e-2)  # pytorch-fid's ε path
  y1, y2 = rng.normal(size=(40, 6)), rng.normal(size=(30, 6))  # enough vectors: the usual route
  assert fid.fid_from_features(y1, y2) == fid.fid_from_stats(
      fid.GaussianStats.from_features(y1), fid.GaussianStats.from_features(y2))
  assert fid.fid_from_features(x1, x1) == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError, match="at least 2"):
    fid.fid_from_features(x1[:1], x2)
