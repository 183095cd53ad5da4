"""End-to-end `evaluate` on bundled real photos with a tiny random tokenizer and test-made weights.

The numbers are meaningless; the plumbing is checked against direct computations on the same
images: per-image PSNR (numpy) and SSIM (scikit-image), the FID feature statistics, zero-shot
predictions and retrieval recalls (numpy, with text tokenised independently), a known-answer
zero-shot case, a kill-and-resume run that must reproduce the uninterrupted report exactly, and
bad inputs (unreadable images, a class list that does not match the labels).

The final Fréchet distance is replaced by a cheap stand-in of the same statistics: scipy's
2048×2048 `sqrtm` takes 20-45 s on a 2-core CPU, and `frechet_distance` itself is tested in
test_metrics_fid.py. What is checked here is that the statistics reaching it are right.
"""

import csv
import functools
import io
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage.metrics import structural_similarity

import tf_example_writer
from dualtoken_jax import config_files, data, evaluate as evaluate_cli
from dualtoken_jax.bridges import inception as inception_weights
from dualtoken_jax.bridges import layout
from dualtoken_jax.bridges import lpips as lpips_weights
from dualtoken_jax.data.sample_photos import sample_photo_paths
from dualtoken_jax.evaluation import EvalOptions, evaluate, report, state
from dualtoken_jax.metrics import fid
from dualtoken_jax.models import inception
from dualtoken_jax.models import lpips as lpips_lib
from dualtoken_jax.models.dualtoken import DualToken, abstract_variables
from dualtoken_jax.tokenizer import DualTokenizer

SIZE = 128  # configs/dualtoken_tiny.py
inception_features = jax.jit(inception.FIDInceptionV3(resize_input=False).apply)


# ---------------------------------------------------------------- test-made weights
def random_tokenizer(seed=0) -> DualTokenizer:
  """The tiny config with random weights drawn on the host (flax's `init` of the whole model
  compiles for ~25 s on this CPU; this takes ~1 s)."""
  config = config_files.model_of(config_files.load("dualtoken_tiny"))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in layout.flatten(abstract_variables(config)).items():
    name, shape = path.rsplit("/", 1)[-1], leaf.shape
    if name == "scale" or name == "cluster_size":
      value = np.ones(shape)
    elif name.endswith("bias") and path.startswith("params/"):
      value = np.zeros(shape)
    elif name == "kernel":
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif path == "params/t":
      value = np.full(shape, np.log(10.0))
    elif path == "params/b":
      value = np.full(shape, -10.0)
    else:  # embeddings, codebooks, probes
      value = rng.normal(size=shape) * 0.5
    flat[path] = value.astype(leaf.dtype)
  return DualTokenizer(config, layout.unflatten(flat))


def write_random_inception(path, seed=1):
  rng = np.random.default_rng(seed)
  flat = {}
  for k, shape in inception.expected_shapes().items():
    name = k.rsplit("/", 1)[-1]
    if name == "kernel":
      flat[k] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    else:
      flat[k] = np.ones(shape) if name in ("scale", "var") else np.zeros(shape)
  inception_weights.save(path, layout.unflatten({k: v.astype(np.float32) for k, v in flat.items()}))


def write_random_lpips(path, seed=2):
  rng = np.random.default_rng(seed)
  arrays = {}
  for k, shape in lpips_lib.param_shapes().items():
    if k.startswith("lin"):
      arrays[k] = np.abs(rng.normal(size=shape)) * 0.1
    elif k.endswith("kernel"):
      arrays[k] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    else:
      arrays[k] = np.zeros(shape)
  np.savez(path, **{k: v.astype(np.float32) for k, v in arrays.items()})


def train_sentencepiece(path):
  import sentencepiece  # pylint: disable=g-import-not-at-top
  sentences = ["a photo of a cat", "a bad photo of the dog", "a sculpture of a bird",
               "the toy car in a video game", "graffiti of a tench", "a close-up photo of a fish",
               "a man rides a horse on the beach", "two dogs play in the snow"] * 4
  buf = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf,
                                           vocab_size=48, hard_vocab_limit=False, minloglevel=2)
  with open(path, "wb") as f:
    f.write(buf.getvalue())


# ---------------------------------------------------------------- fixtures
CLASSES = ("cls_a", "cls_b", "cls_c")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """Data folder (10 photos x 3 copies in 3 class folders + 2 unreadable files), captions,
  class names, Inception and SentencePiece files."""
  root = tmp_path_factory.mktemp("eval_assets")
  folder = root / "images"
  photos = sorted(sample_photo_paths().items())
  assert len(photos) >= 6, "needs the sample photos of scikit-image / scikit-learn / matplotlib"
  names = []
  for copy in range(3):  # the original, mirrored, flipped: 30 distinct images
    for i, (_, path) in enumerate(photos):
      cls = CLASSES[(i + copy) % 3]
      (folder / cls).mkdir(parents=True, exist_ok=True)
      name = f"c{copy}_{os.path.splitext(os.path.basename(path))[0]}.png"
      img = Image.open(path).convert("RGB")
      img.thumbnail((200, 200))  # still a real photo; keeps decoding cheap
      img = (img, ImageOps.mirror(img), ImageOps.flip(img))[copy]
      img.save(folder / cls / name, compress_level=1)
      names.append((cls, name, copy))
  (folder / "cls_a" / "broken.jpg").write_bytes(b"not a jpeg at all")
  (folder / "cls_a" / "empty.png").write_bytes(b"")
  with open(root / "captions.txt", "w", encoding="utf-8") as f:
    f.write("image,caption\n")
    for _, name, copy in names:
      if copy < 2:
        stem = name.split(".")[0].split("_", 1)[1]
        f.write(f"{name},a photo of the {stem} number {copy}\n")
        f.write(f'{name},"a {stem}, again, seen in a video game"\n')
    f.write("missing.jpg,a photo of nothing\nbroken.jpg,a broken photo\n")
  (root / "classes.txt").write_text("a cat\na dog\nthe bird\n")
  (root / "same.txt").write_text("same thing\nsame thing\nsame thing\n")
  (root / "two.txt").write_text("one\ntwo\n")
  write_random_inception(root / "inception.npz")
  train_sentencepiece(root / "tiny.model")
  return root


@pytest.fixture(scope="module")
def tok():
  return random_tokenizer()


@pytest.fixture(scope="module")
def fid_calls():
  """Replaces the final Fréchet distance by ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 and records its inputs."""
  calls = []

  def stand_in(a, b):
    calls.append((a, b))
    return float(np.sum((a.mean() - b.mean()) ** 2) + np.trace(a.covariance())
                 + np.trace(b.covariance()))

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(fid, "fid_from_stats", stand_in)
    yield calls


def main_options(assets, **changes) -> EvalOptions:
  opts = dict(metrics=("rfid", "psnr", "ssim", "usage", "zeroshot", "retrieval"), batch_size=8,
              inception_weights=str(assets / "inception.npz"), fid_resize="none",
              sentencepiece_model=str(assets / "tiny.model"),
              class_names=str(assets / "classes.txt"), captions=str(assets / "captions.txt"),
              num_extremes=3, checkpoint_every=2, num_threads=0, plots=False, progress=False)
  opts.update(changes)
  return EvalOptions(**opts)


@pytest.fixture(scope="module")
def main_run(assets, tok, fid_calls, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("eval_main")
  results = evaluate(tok, str(assets / "images"), str(workdir), main_options(assets, plots=True))
  return workdir, results, fid_calls[-1]


def rel_err(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def read_csv(path):
  with open(path, encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f))


ROWS = 32  # every direct computation is padded to this many rows: one compile per function


def padded(fn, x, *args):
  """fn(*args, x padded with zero rows to ROWS)[:len(x)]."""
  pad = np.zeros((ROWS - len(x),) + x.shape[1:], x.dtype)
  return np.asarray(fn(*args, jnp.asarray(np.concatenate([x, pad]))))[:len(x)]


@functools.partial(jax.jit, static_argnums=0)
def teacher_embeds(model, variables, x):
  e = model.apply(variables, x, method=DualToken.teacher)
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnums=0)
def encode_text(model, variables, tokens):
  return model.apply(variables, tokens, method=DualToken.encode_text)


@pytest.fixture(scope="module")
def direct(assets, tok, main_run):
  """Everything recomputed without the evaluator, for the images of per_image.csv."""
  workdir, _, _ = main_run
  rows = read_csv(workdir / "per_image.csv")
  keys = [r["key"] for r in rows]
  x = np.stack([data.load_image(assets / "images" / k, SIZE) for k in keys])
  recon = padded(tok.reconstruct, x)
  x01, y01 = (x + 1) / 2, (np.clip(recon, -1, 1) + 1) / 2
  weights = inception_weights.load(assets / "inception.npz")
  real, fake = (padded(inception_features, (np.round(z * 255) / 255).astype(np.float32), weights)
                for z in (x01, y01))
  emb_q = padded(lambda z: tok.encode_all(z)["image_embeds"], x)
  emb_t = padded(teacher_embeds, x, tok.model, tok.variables)
  return dict(rows=rows, keys=keys, x=x, recon=recon, x01=x01, y01=y01, real=real, fake=fake,
              emb_q=emb_q, emb_t=emb_t, inception=weights)


def text_embeddings(assets, tok, texts):
  """SigLIP conventions written out independently: lower-case, punctuation dropped, ids,
  EOS, EOS padding to max_len."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  sp = sentencepiece.SentencePieceProcessor(model_file=str(assets / "tiny.model"))
  max_len = tok.config.text.max_len
  tokens = np.full((len(texts), max_len), sp.eos_id(), np.int32)
  for i, t in enumerate(texts):
    words = re.sub(r"[^\w\s]", "", t.lower().replace("_", " ")).split()
    ids = sp.encode(" ".join(words))[:max_len - 1]
    tokens[i, :len(ids)] = ids
  tokens = np.concatenate([tokens, np.zeros((-len(tokens) % 256, max_len), np.int32)])
  return np.concatenate([np.asarray(encode_text(tok.model, tok.variables, tokens[i:i + 256]))
                         for i in range(0, len(tokens), 256)])[:len(texts)]


# ---------------------------------------------------------------- the report
def test_report_files_counts_and_unreadable_images(main_run):
  workdir, results, _ = main_run
  for name in ("metrics.json", "per_image.csv", "reconstructions.png", "codebook_pixel.png",
               "codebook_semantic.png"):
    assert (workdir / name).is_file(), name
  assert json.loads((workdir / "metrics.json").read_text())["num_images"] == 30
  assert results["num_records"] == 32 and results["num_images"] == 30
  bad = results["unreadable"]
  assert bad["count"] == 2 and bad["by_reason"] == {"decode_error": 1, "empty": 1}
  assert sorted(bad["keys"]) == ["cls_a/broken.jpg", "cls_a/empty.png"]
  grid = Image.open(workdir / "reconstructions.png")
  assert grid.width >= 4 * SIZE and grid.height >= 4 * SIZE  # 3 worst + 3 best pairs, 2 per row
  tokens = 30 * (SIZE // 16) ** 2
  for quantiser in ("pixel", "semantic"):
    levels = results["codebook"][quantiser]
    assert [levels[f"level_{d}"]["num_tokens"] for d in range(4)] == [tokens] * 4
    assert levels["all"]["num_tokens"] == 4 * tokens
    assert 0 < levels["all"]["normalized_entropy"] <= 1


def test_psnr_ssim_match_numpy_and_skimage(main_run, direct):
  _, results, _ = main_run
  psnr, ssim = [], []
  for row, a, b in zip(direct["rows"], direct["x01"], direct["y01"]):
    psnr.append(10 * np.log10(1 / (np.mean((a - b) ** 2) + 1e-8)))
    ssim.append(structural_similarity(a, b, gaussian_weights=True, sigma=1.5, data_range=1.0,
                                      use_sample_covariance=False, channel_axis=-1))
    assert float(row["psnr"]) == pytest.approx(psnr[-1], abs=2e-3), row["key"]
    assert float(row["ssim"]) == pytest.approx(ssim[-1], abs=2e-4), row["key"]
  assert results["psnr"] == pytest.approx(np.mean(psnr), abs=1e-3)
  assert results["ssim"] == pytest.approx(np.mean(ssim), abs=1e-4)


def test_fid_statistics_are_those_of_the_direct_features(main_run, direct):
  _, results, (real, fake) = main_run
  # Inputs are exact 8-bit levels; a reconstruction pixel may round to the neighbouring level
  # when computed on 1 device instead of 8, hence the looser bound for the fake side.
  for name, got, feats, tol in (("real", real, direct["real"], 1e-5),
                                ("fake", fake, direct["fake"], 1e-3)):
    want = fid.GaussianStats.from_features(feats)
    assert got.count == want.count == 30
    assert rel_err(got.mean(), want.mean()) < tol, name
    assert rel_err(got.covariance(), want.covariance()) < 10 * tol, name
  assert results["rfid"] == fid.fid_from_stats(real, fake)  # the stand-in, on those statistics


def test_zeroshot_matches_numpy(assets, tok, main_run, direct):
  _, results, _ = main_run
  from dualtoken_jax.evaluation import imagenet_classes  # pylint: disable=g-import-not-at-top
  names = (assets / "classes.txt").read_text().split("\n")[:3]
  prompts = [t.format(c) for c in names for t in imagenet_classes.TEMPLATES]
  e = text_embeddings(assets, tok, prompts).reshape(3, 80, -1)
  e /= np.linalg.norm(e, axis=-1, keepdims=True)
  w = e.mean(axis=1)
  w /= np.linalg.norm(w, axis=-1, keepdims=True)
  labels = np.array([CLASSES.index(k.split("/")[0]) for k in direct["keys"]])
  for path, emb in (("quantized", direct["emb_q"]), ("teacher", direct["emb_t"])):
    pred = np.argmax(emb @ w.T, axis=1)
    assert [int(r[f"pred_{path}"]) for r in direct["rows"]] == pred.tolist(), path
    assert results["zeroshot"][path]["top1"] == pytest.approx(100 * np.mean(pred == labels))
  assert [int(r["label"]) for r in direct["rows"]] == labels.tolist()
  assert results["zeroshot"]["top1_drop"] == pytest.approx(
      results["zeroshot"]["teacher"]["top1"] - results["zeroshot"]["quantized"]["top1"])


def test_retrieval_matches_numpy(assets, tok, main_run, direct):
  _, results, _ = main_run
  pairs = [line.split(",", 1) for line in (assets / "captions.txt").read_text().splitlines()[1:]]
  name_row = {k.split("/")[1]: i for i, k in enumerate(direct["keys"])}
  kept = [(name_row[n], c.strip('"')) for n, c in pairs if n in name_row]
  gallery = sorted({r for r, _ in kept})
  owner = np.array([gallery.index(r) for r, _ in kept])
  txt = text_embeddings(assets, tok, [c for _, c in kept])
  # Exact ties are part of the check: the tiny vocabulary has no digits, so "… number 0" and
  # "… number 1" are the same tokens, and each "again" caption is written for both copies of a
  # photo: 20 distinct captions, each owned by two images. Only strictly greater scores
  # outrank, so the scores are computed exactly (`txt @ emb.T` would score equal rows at
  # different positions 1 ulp apart and break those ties by row order).
  assert len(np.unique(txt, axis=0)) == 20
  r = results["retrieval"]
  assert (r["num_images"], r["num_captions"]) == (20, 40)
  assert (r["images_without_captions"], r["captions_without_image"]) == (10, 2)
  for path, emb in (("quantized", direct["emb_q"]), ("teacher", direct["emb_t"])):
    sim = np.array([[math.fsum(t * e) for e in np.float64(emb[gallery])]
                    for t in np.float64(txt)])
    t2i = np.array([np.sum(sim[c] > sim[c, owner[c]]) for c in range(len(owner))])
    i2t = np.array([np.sum(sim[:, i] > sim[owner == i, i].max()) for i in range(len(gallery))])
    for k in (1, 5, 10):
      assert r[path][f"t2i_r{k}"] == pytest.approx(100 * np.mean(t2i < k)), (path, k)
      assert r[path][f"i2t_r{k}"] == pytest.approx(100 * np.mean(i2t < k)), (path, k)


def test_zeroshot_known_answer_identical_classes(assets, tok, fid_calls, tmp_path):
  """Identical class names give identical class weights: every image is predicted as class 0
  (ties go to the lowest id), so top-1 is exactly the share of class-0 images."""
  del fid_calls
  res = evaluate(tok, str(assets / "images"), str(tmp_path),
                 main_options(assets, metrics=("zeroshot",), class_names=str(assets / "same.txt")))
  rows = read_csv(tmp_path / "per_image.csv")
  assert {r["pred_quantized"] for r in rows} == {r["pred_teacher"] for r in rows} == {"0"}
  share = 100 * sum(r["label"] == "0" for r in rows) / len(rows)
  assert 0 < share < 100
  assert res["zeroshot"]["quantized"]["top1"] == pytest.approx(share)
  assert res["zeroshot"]["teacher"]["top1"] == pytest.approx(share)


# ---------------------------------------------------------------- resume
class Killed(Exception):
  pass


def test_killed_run_resumes_to_the_identical_report(assets, tok, main_run, fid_calls, tmp_path):
  main_dir, main_results, (main_real, main_fake) = main_run
  opts = main_options(assets)

  def kill_after_3(position):
    if position == 3:
      raise Killed()

  with pytest.raises(Killed):
    evaluate(tok, str(assets / "images"), str(tmp_path), opts, after_batch=kill_after_3)
  # Saved after batch 2 (checkpoint_every=2); batch 3's rows were lost with the process.
  assert state.saved_positions(str(tmp_path), 0) == [2]
  seen = []
  resumed = evaluate(tok, str(assets / "images"), str(tmp_path), opts, after_batch=seen.append)
  assert seen == [3, 4]
  real, fake = fid_calls[-1]
  for a, b in ((real, main_real), (fake, main_fake)):
    assert a.count == b.count
    np.testing.assert_array_equal(a.total, b.total)
    np.testing.assert_array_equal(a.outer, b.outer)
  strip = lambda r: {k: v for k, v in r.items() if k != "throughput"}
  assert strip(resumed) == strip(main_results)
  assert (tmp_path / "per_image.csv").read_text() == (main_dir / "per_image.csv").read_text()

  # A finished run only rewrites its report.
  again = evaluate(tok, str(assets / "images"), str(tmp_path), opts, after_batch=seen.append)
  assert seen == [3, 4] and strip(again) == strip(main_results)
  # Different settings in the same workdir are refused.
  with pytest.raises(state.FingerprintMismatch, match="metrics"):
    evaluate(tok, str(assets / "images"), str(tmp_path),
             main_options(assets, metrics=("psnr", "ssim", "zeroshot")))


# ---------------------------------------------------------------- bad inputs
def test_class_list_that_does_not_match_the_class_folders(assets, tok, tmp_path):
  with pytest.raises(ValueError, match=r"class list has 2 names but .* has 3 classes"):
    evaluate(tok, str(assets / "images"), str(tmp_path),
             main_options(assets, class_names=str(assets / "two.txt")))


def test_label_ids_outside_the_class_list(assets, tok, tmp_path):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "val.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for i, label in enumerate((0, 1, 7)):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (i * 50, 90, 200)).save(buf, format="PNG")
    writer.write(tf_example_writer.encode_example({"image": buf.getvalue(), "label": label,
                                            "file_name": f"img{i}.png"}))
  writer.close()
  with pytest.raises(ValueError, match=r"'img2.png' has label id 7, outside .* 0\.\.2"):
    evaluate(tok, f"arrayrecord:{path}", str(tmp_path / "work"),
             main_options(assets, metrics=("zeroshot",), key_feature="file_name"))


def test_missing_weights_are_named(assets):
  with pytest.raises(ValueError, match="--inception_weights"):
    main_options(assets, inception_weights=None).validate()
  with pytest.raises(ValueError, match="convert_lpips"):
    main_options(assets, metrics=("lpips",)).validate()
  with pytest.raises(ValueError, match="unknown metrics"):
    main_options(assets, metrics=("rfid", "fid")).validate()


# ---------------------------------------------------------------- LPIPS and the host rFID path
def test_lpips_and_jpeg_roundtrip(assets, tok, fid_calls, direct, tmp_path):
  write_random_lpips(tmp_path / "lpips.npz")
  res = evaluate(tok, str(assets / "images"), str(tmp_path / "work"),
                 main_options(assets, metrics=main_options(assets).metrics + ("lpips",),
                              jpeg_quality=90, lpips_weights=str(tmp_path / "lpips.npz"),
                              max_images=8))
  rows = read_csv(tmp_path / "work" / "per_image.csv")
  index = [direct["keys"].index(r["key"]) for r in rows]  # these images are in the main run
  x, y = direct["x"][index], np.clip(direct["recon"][index], -1, 1)
  want = jax.jit(lpips_lib.lpips_fn(lpips_weights.load(tmp_path / "lpips.npz")))(x, y)
  np.testing.assert_allclose([float(r["lpips"]) for r in rows], want, rtol=1e-3, atol=1e-5)
  assert res["lpips"] == pytest.approx(float(np.mean(want)), rel=1e-3)

  def jpeg(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90, subsampling="4:2:0")
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())))

  both = np.round(np.concatenate([direct["x01"][index], direct["y01"][index]]) * 255)
  both = np.stack([jpeg(i) for i in both.astype(np.uint8)]).astype(np.float32) / 255
  feats = np.split(padded(inception_features, both, direct["inception"]), 2)
  real, fake = fid_calls[-1]
  for name, got, feats, tol in (("real", real, feats[0], 1e-5), ("fake", fake, feats[1], 5e-3)):
    assert got.count == len(rows)
    assert rel_err(got.mean(), feats.mean(axis=0)) < tol, name
    plain = direct["real" if name == "real" else "fake"][index].mean(axis=0)
    assert rel_err(got.mean(), plain) > 10 * tol, name  # the JPEG round trip did happen


# ---------------------------------------------------------------- command line
def test_cli_with_config_and_checkpoint(assets, tok, fid_calls, tmp_path, capsys):
  del fid_calls
  tok.save(tmp_path / "tok")
  o = main_options(assets)
  code = evaluate_cli.main([
      "--config", "configs/dualtoken_tiny.py", "--checkpoint", str(tmp_path / "tok"),
      "--data", f"folder:{assets / 'images'}", "--workdir", str(tmp_path / "work"),
      "--metrics", "zeroshot", "--batch_size", "8", "--max_images", "8",
      "--inception_weights", o.inception_weights, "--fid_resize", "none",
      "--sentencepiece_model", o.sentencepiece_model, "--class_names", o.class_names,
      "--captions", o.captions, "--num_threads", "0", "--no_progress"])
  assert code == 0
  captured = capsys.readouterr()
  out = captured.out
  assert "differs from the checkpoint's config" not in captured.err  # same model config
  assert "images: 7 of 8 records" in out and "unreadable: 1" in out
  assert "zero-shot quantized: top1" in out and "zero-shot teacher: top1" in out
  metrics = json.loads((tmp_path / "work" / "metrics.json").read_text())
  assert metrics["settings"]["tokenizer"] == str(tmp_path / "tok")
  assert metrics["settings"]["max_images"] == 8 and metrics["settings"]["metrics"] == ["zeroshot"]
  assert metrics["settings"]["inception_weights"] == o.inception_weights


# ---------------------------------------------------------------- what was evaluated
def write_training_step(workdir, step, tokenizer):
  """A `train` workdir's checkpoint step as `load_training_run` reads it: the tokenizer's
  params and EMA codebooks under state/, the run's config under meta/."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "meta"),
                                  options=ocp.CheckpointManagerOptions(create=True))
  host = layout.to_host(tokenizer.variables)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": host["params"], "vq_stats": host["vq_stats"]}),
      meta=ocp.args.JsonSave({"step": step, "config": {"model": tokenizer.config.to_dict()}})))
  manager.wait_until_finished()
  manager.close()


def test_a_training_run_that_gained_a_step_is_not_mixed_with_the_old_results(
    assets, tok, fid_calls, tmp_path, capsys):
  del fid_calls
  from dualtoken_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  write_training_step(run, 1, tok)
  cli = lambda work: evaluate_cli.main([
      "--checkpoint", str(run), "--data", f"folder:{assets / 'images'}", "--workdir", str(work),
      "--metrics", "psnr,usage", "--batch_size", "8", "--max_images", "8", "--num_threads", "0",
      "--no_progress", "--no_plots"])
  assert cli(tmp_path / "work") == 0
  first = json.loads((tmp_path / "work" / "metrics.json").read_text())
  assert first["settings"]["tokenizer"] == str(run / "checkpoints" / "1")
  assert first["settings"]["weights"] == runner.weights_digest(tok.variables)

  newer = random_tokenizer(seed=7)
  write_training_step(run, 2, newer)
  capsys.readouterr()
  assert cli(tmp_path / "work") == 2  # not the old step's state, rewritten as a new report
  err = capsys.readouterr().err
  assert "weights" in err and str(run / "checkpoints" / "2") in err and "new --workdir" in err
  assert json.loads((tmp_path / "work" / "metrics.json").read_text()) == first
  assert cli(tmp_path / "work2") == 0
  second = json.loads((tmp_path / "work2" / "metrics.json").read_text())
  assert second["settings"]["tokenizer"] == str(run / "checkpoints" / "2")
  assert second["settings"]["weights"] == runner.weights_digest(newer.variables)
  assert second["settings"]["weights"] != first["settings"]["weights"]
  assert second["psnr"] != first["psnr"]

  # The library call: the same tokenizer_id with other weights is refused too.
  opts = main_options(assets, metrics=("psnr",), max_images=8)
  evaluate(tok, str(assets / "images"), str(tmp_path / "lib"), opts, tokenizer_id="same/path")
  with pytest.raises(state.FingerprintMismatch, match="weights"):
    evaluate(newer, str(assets / "images"), str(tmp_path / "lib"), opts, tokenizer_id="same/path")
