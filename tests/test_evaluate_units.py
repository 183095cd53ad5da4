"""Evaluation maths and parsing, against independent numpy computations and hand-made cases."""

import io
import math
import os

import numpy as np
import pytest

from dualtoken_jax.evaluation import (data_spec, imagenet_classes, retrieval, state, text,
                                      zeroshot)
from dualtoken_jax.metrics import fid


# ---------------------------------------------------------------- class names and templates
def test_imagenet_lists_are_the_clip_lists():
  names, templates = imagenet_classes.CLASSNAMES, imagenet_classes.TEMPLATES
  assert len(names) == 1000 and len(templates) == 80 and len(set(templates)) == 80
  assert all(t.count("{}") == 1 for t in templates)
  assert names[:3] == ("tench", "goldfish", "great white shark")
  assert names[285] == "Egyptian Mau" and names[999] == "toilet paper"
  assert names[657] == names[744] == "missile"  # the notebook's duplicate, kept for id order
  assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
  assert zeroshot.load_class_names(None) is names


# ---------------------------------------------------------------- zero-shot
def test_class_embeddings_normalise_average_renormalise():
  rng = np.random.default_rng(0)
  e = rng.normal(size=(4, 3, 5)) * rng.uniform(0.5, 3, size=(4, 3, 1))  # uneven norms
  got = zeroshot.class_embeddings(e)
  for c in range(4):
    unit = [v / np.linalg.norm(v) for v in e[c]]
    mean = np.mean(unit, axis=0)
    np.testing.assert_allclose(got[c], mean / np.linalg.norm(mean), rtol=1e-5)


def test_topk_accuracy_known_answer():
  # 4 images; class scores chosen so the ranking is known.
  topk = np.array([[2, 0, 1], [0, 1, 2], [1, 2, 0], [2, 1, 0]])
  labels = np.array([2, 1, 0, 0])
  assert list(zeroshot.topk_correct(topk, labels, 1)) == [True, False, False, False]
  assert list(zeroshot.topk_correct(topk, labels, 2)) == [True, True, False, False]
  assert zeroshot.accuracy(topk, labels, ks=(1, 2, 3)) == {"top1": 25.0, "top2": 50.0,
                                                           "top3": 100.0}
  assert "top5" not in zeroshot.accuracy(topk, labels)  # fewer classes than k


def test_class_list_checks_name_the_mismatch():
  with pytest.raises(ValueError, match=r"3 names but .* has 4 classes.*class folders a, b"):
    zeroshot.check_class_names(["x", "y", "z"], 4, ("a", "b", "c", "d"), "data/")
  zeroshot.check_class_names(["x", "y"], None)  # unknown until the labels are read
  with pytest.raises(ValueError, match=r"image 'k2' has label id 7, outside .* 0\.\.2"):
    zeroshot.check_labels(np.array([0, 2, 7]), ["k0", "k1", "k2"], 3)


# ---------------------------------------------------------------- retrieval
def _exact_scores(img, txt):
  """txt · img exactly rounded (float32 products are exact in float64, `math.fsum` rounds the
  sum once): equal embeddings get equal scores wherever they sit, unlike a BLAS `txt @ img.T`,
  which gives rows at different positions different blockings."""
  img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
  return np.array([[math.fsum(t * i) for i in img] for t in txt])


def _brute_force_recall(img, txt, owner, ks):
  """Independent reference: sort every query's scores (ties towards the positive)."""
  sim = _exact_scores(img, txt)
  t2i, i2t = [], []
  for c in range(len(txt)):
    order = np.lexsort((np.arange(len(img)) != owner[c], -sim[c]))  # ties: positive first
    t2i.append(int(np.sum(sim[c] > sim[c, owner[c]])))
    assert owner[c] in order[:t2i[-1] + 1]
  for i in range(len(img)):
    ranks = [int(np.sum(sim[:, i] > sim[c, i])) for c in np.flatnonzero(owner == i)]
    i2t.append(min(ranks))
  t2i, i2t = np.array(t2i), np.array(i2t)
  return {**{f"t2i_r{k}": 100 * np.mean(t2i < k) for k in ks},
          **{f"i2t_r{k}": 100 * np.mean(i2t < k) for k in ks}}


def test_recall_known_answer():
  img = np.eye(3, dtype=np.float32)                      # images e0, e1, e2
  txt = np.array([[1, 0, 0], [0, .6, .8], [0, 1, 0], [.8, 0, .6]], np.float32)
  owner = np.array([0, 1, 1, 2])                         # image 1 has two captions
  r = retrieval.recall_at_k(img, txt, owner, ks=(1, 2))
  # t2i ranks: c0 -> 0; c1 (own image 1 scores .6, image 2 .8) -> 1; c2 -> 0;
  # c3 (own image 2 scores .6, image 0 .8) -> 1.
  assert r["t2i_r1"] == 50.0 and r["t2i_r2"] == 100.0
  # i2t: image 0 best own caption c0 (1.0; c3 scores .8 below) -> 0; image 1 via c2 -> 0;
  # image 2: own c3 scores .6, c1 scores .8 -> rank 1.
  assert r["i2t_r1"] == pytest.approx(200 / 3) and r["i2t_r2"] == 100.0


def test_recall_matches_brute_force_with_chunks():
  rng = np.random.default_rng(1)
  img = text.l2_normalize(rng.normal(size=(23, 8)))
  owner = np.concatenate([np.arange(23), rng.integers(0, 23, 30)])
  txt = text.l2_normalize(img[owner] + rng.normal(scale=0.9, size=(len(owner), 8)))
  got = retrieval.recall_at_k(img, txt, owner, ks=(1, 5, 10), chunk=7)
  want = _brute_force_recall(img, txt, owner, (1, 5, 10))
  assert got.keys() == want.keys()
  for k in got:
    assert got[k] == pytest.approx(want[k]), k
  assert 0 < got["t2i_r1"] < 100  # neither trivial nor hopeless


def test_recall_exact_ties_from_duplicate_captions_and_images():
  """Captions repeated across images and duplicate images tie exactly: the strictly-better
  rule, whatever the order of the rows or the chunking. Duplicates sit far apart (rows i and
  i + 20), where a plain float32 `txt @ img.T` scores equal rows 1 ulp apart."""
  rng = np.random.default_rng(3)
  base = text.l2_normalize(rng.normal(size=(10, 64)))
  img = np.concatenate([base, base[:3], text.l2_normalize(rng.normal(size=(7, 64)))])  # 20
  x = text.l2_normalize(img[:20] + rng.normal(scale=0.8, size=(20, 64)))
  txt = np.concatenate([x, x[np.r_[10:20, 0:10]]])         # caption c+20 = caption of image c±10
  owner = np.arange(40) % 20
  want = _brute_force_recall(img, txt, owner, (1, 5, 10))
  assert 0 < want["i2t_r1"] < 100 and 0 < want["t2i_r1"] < 100
  for seed, chunk in ((None, 4096), (None, 7), (0, 4096), (1, 3)):
    perm = np.arange(40) if seed is None else np.random.default_rng(seed).permutation(40)
    got = retrieval.recall_at_k(img, txt[perm], owner[perm], ks=(1, 5, 10), chunk=chunk)
    assert got == pytest.approx(want), (seed, chunk)
  # Known answer: every image's captions are those of the others with all-equal embeddings.
  r = retrieval.recall_at_k(np.ones((3, 4)) / 2, np.ones((6, 4)) / 2, np.arange(6) % 3)
  assert all(v == 100.0 for v in r.values())


def test_recall_rejects_images_without_captions():
  with pytest.raises(ValueError, match="at least one caption"):
    retrieval.recall_at_k(np.eye(3), np.eye(3)[:2], np.array([0, 1]))


def test_gallery_matching_and_counts():
  pairs = [("a.jpg", "x"), ("b.jpg", "y"), ("a.jpg", "z"), ("gone.jpg", "w")]
  keys = ["d1/a.jpg", "d2/b.jpg", "d2/c.jpg"]
  lookup = data_spec.match_caption_images(pairs, keys)
  rows, caps, owner, counts = retrieval.gallery(keys, pairs, lookup)
  assert rows.tolist() == [0, 1] and caps == ["x", "y", "z"] and owner.tolist() == [0, 1, 0]
  assert counts == {"images_without_captions": 1, "captions_without_image": 1}


# ---------------------------------------------------------------- SigLIP text tokenisation
@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  import sentencepiece  # pylint: disable=g-import-not-at-top
  sentences = ["a photo of a cat", "a bad photo of the dog", "the toy car in a video game",
               "graffiti of a tench", "two dogs play in the snow"] * 4
  buf = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf,
                                           vocab_size=40, hard_vocab_limit=False,
                                           minloglevel=2)
  path = tmp_path_factory.mktemp("spm") / "tiny.model"
  path.write_bytes(buf.getvalue())
  return str(path)


def test_siglip_tokenizer_eos_and_padding(spm_model):
  import sentencepiece  # pylint: disable=g-import-not-at-top
  sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
  eos, ids = sp.eos_id(), sp.encode("a photo of a cat")
  n = len(ids) + 3
  tok = text.SigLIPTokenizer(spm_model, max_len=n)
  short, long = tok(["A photo of a CAT!", "a photo of the cat " * 5])
  assert short.tolist() == ids + [eos] * 3                         # EOS, then EOS padding
  assert long[-1] == eos
  assert long[:-1].tolist() == sp.encode(("a photo of the cat " * 5).strip())[:n - 1]
  assert tok(["graffiti_of a tench."])[0].tolist() == tok(["graffiti of a tench"])[0].tolist()
  assert text.canonicalize("  The  Toy&amp;car, in_a  VIDEO-game. ") == "the toycar in a videogame"
  with pytest.raises(ValueError, match="text tower embeds only 10"):
    text.SigLIPTokenizer(spm_model, max_len=12, vocab_size=10)
  with pytest.raises(FileNotFoundError, match="--sentencepiece_model"):
    text.SigLIPTokenizer(os.path.join(os.path.dirname(spm_model), "nope.model"), 12)


# ---------------------------------------------------------------- data specs, labels, captions
def test_data_spec_kinds(tmp_path):
  parse = data_spec._parse  # pylint: disable=protected-access
  assert parse("sample") == ("sample", "")
  assert parse(str(tmp_path)) == ("folder", str(tmp_path))
  assert parse("folder:/x") == ("folder", "/x")
  assert parse("/d/val-{0000..0009}.tar") == ("tar", "/d/val-{0000..0009}.tar")
  assert parse("/d/imagenet2012-validation.array_record-*") == (
      "arrayrecord", "/d/imagenet2012-validation.array_record-*")
  assert parse("tfds:imagenet2012:validation") == ("tfds", "imagenet2012:validation")
  with pytest.raises(ValueError, match="cannot tell what data spec"):
    parse("/no/such/thing")


def test_folder_labels_follow_sorted_class_folders(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for folder in ("n02", "n01", "n03"):
    (tmp_path / folder).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / folder / "x.png")
  src = data_spec.open_source(str(tmp_path), with_labels=True)
  assert src.num_classes == 3 and src.class_folders == ("n01", "n02", "n03")
  assert [data_spec.split_key(src.source[i]["key"]) for i in range(3)] == [
      ("n01/x.png", 0), ("n02/x.png", 1), ("n03/x.png", 2)]
  assert len(data_spec.open_source(str(tmp_path), max_images=2)) == 2
  Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
  with pytest.raises(ValueError, match="one subfolder per class"):
    data_spec.open_source(str(tmp_path), with_labels=True)
  labels = tmp_path / "labels.csv"
  labels.write_text("key,label\nloose.png,5\nn01/x.png,0\nx.png,9\n")
  src = data_spec.open_source(str(tmp_path), with_labels=True, labels_file=str(labels))
  got = [data_spec.split_key(src.source[i]["key"]) for i in range(len(src))]
  assert got == [("loose.png", 5), ("n01/x.png", 0), ("n02/x.png", 9), ("n03/x.png", 9)]


def test_read_captions_layouts(tmp_path):
  f = tmp_path / "captions.txt"
  f.write_text('image,caption\n1.jpg,A dog , running .\n1.jpg,"Quoted, with ""quotes"""\n'
               "2.jpg,plain\n\n")
  assert data_spec.read_captions(f) == [("1.jpg", "A dog , running ."),
                                        ("1.jpg", 'Quoted, with "quotes"'), ("2.jpg", "plain")]
  g = tmp_path / "Flickr8k.token.txt"
  g.write_text("1.jpg#0\tA dog .\n1.jpg#1\tAnother dog .\n")
  assert data_spec.read_captions(g) == [("1.jpg", "A dog ."), ("1.jpg", "Another dog .")]
  h = tmp_path / "bad.txt"
  h.write_text("image,caption\nno separator here\n")
  with pytest.raises(ValueError, match=r"bad.txt:2: expected"):
    data_spec.read_captions(h)


# ---------------------------------------------------------------- accumulators
def test_extremes_keep_the_worst_and_best_and_fetch_only_newcomers():
  rng = np.random.default_rng(2)
  psnr = rng.normal(20, 5, 40)
  keys = np.array([f"img{i:02d}" for i in range(40)])
  images = np.arange(40, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
  ex = state.Extremes(3)
  fetched = []
  for s in range(0, 40, 8):
    sl = slice(s, s + 8)

    def fetch(rows, sl=sl):
      fetched.append(len(rows))
      return images[sl][rows], 255 - images[sl][rows]
    ex.offer(keys[sl], psnr[sl], fetch)
  worst, best = ex.ranked()
  assert ex.keys[worst].tolist() == keys[np.argsort(psnr)[:3]].tolist()
  assert ex.keys[best].tolist() == keys[np.argsort(-psnr)[:3]].tolist()
  ids = [int(k[3:]) for k in ex.keys]
  assert ex.originals[:, 0, 0, 0].tolist() == ids and ex.recons[:, 0, 0, 0].tolist() == [
      255 - i for i in ids]
  assert sum(fetched) < 40  # later batches fetch only rows that enter


def test_state_roundtrip_and_fingerprint(tmp_path):
  acc = state.Accumulators(fid_real=fid.GaussianStats.from_features(np.eye(3)),
                           extremes=state.Extremes(2))
  acc.add_rows(key=np.array(["a", "b"]), psnr=np.array([1.0, 2.0], np.float32))
  acc.position = 1
  acc.add_skips({"decode_error": 1}, ["bad.jpg"])
  state.save(acc, str(tmp_path), 0, {"run": 1})
  acc.add_rows(key=np.array(["c"]), psnr=np.array([3.0], np.float32))
  acc.position = 2
  state.save(acc, str(tmp_path), 0, {"run": 1})
  acc.position = 3
  state.save(acc, str(tmp_path), 0, {"run": 1})
  assert state.saved_positions(str(tmp_path), 0) == [2, 3]  # two newest kept
  back = state.load(str(tmp_path), 0, 3, {"run": 1})
  rows = state.load_rows(str(tmp_path), back)
  assert rows["key"].tolist() == ["a", "b", "c"] and rows["psnr"].tolist() == [1, 2, 3]
  assert back.skipped == {"decode_error": 1} and back.skipped_keys == ["bad.jpg"]
  np.testing.assert_array_equal(back.fid_real.outer, acc.fid_real.outer)
  with pytest.raises(state.FingerprintMismatch, match=r"run: saved 1, now 2"):
    state.load(str(tmp_path), 0, 3, {"run": 2})


# ---------------------------------------------------------------- command line helpers
def test_config_differences_ignore_tuple_vs_list():
  import json  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dualtoken_jax import config_files, evaluate  # pylint: disable=g-import-not-at-top
  tiny = config_files.model_of(config_files.load("dualtoken_tiny"))
  roundtrip = ml_collections.ConfigDict(json.loads(tiny.to_json()))
  assert evaluate.config_differences(tiny, roundtrip) == []
  other = config_files.model_of(config_files.load("dualtoken_b16"))
  diffs = evaluate.config_differences(tiny, other)
  assert "image_size: 128 vs 224" in diffs and any(d.startswith("vision.width") for d in diffs)


def test_cli_flags_map_to_options():
  from dualtoken_jax import evaluate  # pylint: disable=g-import-not-at-top
  args = evaluate.build_parser().parse_args(
      ["--config", "c.py", "--data", "d", "--workdir", "w", "--metrics", "psnr, zeroshot",
       "--jpeg_quality", "95", "--fid_resize", "pil_bicubic", "--no_plots", "--max_images", "5"])
  o = evaluate.options_from_args(args)
  assert o.metrics == ("psnr", "zeroshot") and o.jpeg_quality == 95 and not o.plots
  assert o.fid_resize == "pil_bicubic" and o.max_images == 5 and o.batch_size == 64


# ---------------------------------------------------------------- host image round trips
def test_clean_resize_is_pil_bicubic_on_float_channels():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dualtoken_jax.evaluation import steps  # pylint: disable=g-import-not-at-top
  # A smooth image (no overshoot to clip), where PIL's 8-bit path differs only by rounding.
  yy, xx = np.mgrid[0:96, 0:128]
  img = np.stack([30 + xx * 1.5, 40 + yy * 1.8, 128 + 60 * np.sin(xx / 20.0 + yy / 30.0)],
                 axis=-1).round().astype(np.uint8)
  out = steps.clean_resize(img)
  assert out.shape == (299, 299, 3) and out.dtype == np.float32
  assert 0 <= out.min() and out.max() <= 1
  rgb = np.asarray(Image.fromarray(img).resize((299, 299), Image.BICUBIC)) / 255
  diff = np.abs(out - rgb) * 255  # PIL's 8-bit path rounds after each of its two passes
  assert diff.max() < 1.5 and diff.mean() < 0.5
  flat = steps.clean_resize(np.full((80, 90, 3), 77, np.uint8))
  np.testing.assert_allclose(flat, 77 / 255, atol=1e-6)
  assert steps.prepare_fid_images(img[None], None, "none").shape == (1, 96, 128, 3)
  jpeg = steps.prepare_fid_images(img[None], 50, "none")[0]
  assert 0 < np.mean(np.abs(jpeg - img / 255)) < 0.5  # lossy, but the same picture
