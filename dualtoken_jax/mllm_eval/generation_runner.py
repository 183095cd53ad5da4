"""The generation benchmarks' runner: a model draws images for a task's prompts in batches,
resumably, into the folder layout the task's official scorer reads, and scores them natively.

    python -m dualtoken_jax.evaluate_mllm --checkpoint RUN --task geneval \
        --data geneval/prompts/evaluation_metadata.jsonl --workdir W \
        --siglip_tokenizer spiece.model

Images go to `W/images/` (`generation_tasks.LAYOUTS`). The prompts' samples are cut into
fixed batches of `batch_size` images; batch c is drawn with the PRNG stream
`fold_in(key(seed), c)` (`UnifiedModel.generate_images_batch`, KV-cached CFG sampling), so a
re-run after a kill skips every batch whose prompts all have their files, redraws the others
identically and writes only the prompts still missing (files are written atomically).
`W/run.json` records the settings; a re-run with different ones is refused (`runner`).

Scores (`W/metrics.json` and a one-screen summary):
* **alignment** (every task): the tokenizer's own SigLIP towers on prompt and image, per
  (prompt, sample) pair: cosine of the L2-normalised text and image embeddings, SigLIP's pair
  logit exp(t) * cosine + b (its learned temperature and bias) and its sigmoid, the pair
  probability; means over all pairs (and per category / tag). "siglip" uses the plain vision
  tower (the one the text tower was trained with), "quantised" the semantic path after the
  quantiser (`DualToken.encode`'s `image_embeds`). Texts are tokenised as SigLIP does
  (`evaluation.text.SigLIPTokenizer`, truncated to the tower's `max_len`).
* **FID** (mjhq): per category and overall between the generated images and the reference
  images, both as 8-bit images resized to 299 px with clean-fid's PIL bicubic
  (`evaluation.steps.clean_resize`), Inception pool3 features (user-supplied weights,
  `convert_inception`), `metrics.fid.fid_from_features` (exact in the images' own space when a
  side has fewer images than the 2048 feature dimensions). A category with fewer than 2 images
  on either side has no FID (reported as null with the counts).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from dualtoken_jax.bridges import inception as inception_weights
from dualtoken_jax.data import decode
from dualtoken_jax.data.images import to_uint8
from dualtoken_jax.data.transforms import resize_center_crop, to_float
from dualtoken_jax.evaluation import steps
from dualtoken_jax.evaluation import text
from dualtoken_jax.metrics import fid
from dualtoken_jax.mllm_eval import generation_tasks as gen
from dualtoken_jax.mllm_eval import runner
from dualtoken_jax.models import inception
from dualtoken_jax.models.dualtoken import DualToken
from dualtoken_jax.parallel import sharding

IMAGES = "images"


# ---------------------------------------------------------------- alignment
def pair_scores(text_embeds, image_embeds, t, b) -> dict[str, np.ndarray]:
  """Per-pair alignment of row i of `text_embeds` with row i of `image_embeds` (N, D): the
  cosine (rows L2-normalised here), SigLIP's logit exp(t) * cosine + b and its sigmoid."""
  x = text.l2_normalize(np.asarray(text_embeds, np.float32))
  y = text.l2_normalize(np.asarray(image_embeds, np.float32))
  if x.shape != y.shape or x.ndim != 2:
    raise ValueError(f"pair_scores needs equal (N, D) arrays, got {x.shape} and {y.shape}")
  cosine = np.sum(x.astype(np.float64) * y, axis=-1)
  logit = np.exp(float(np.asarray(t).reshape(-1)[0])) * cosine + float(np.asarray(b).reshape(-1)[0])
  return {"cosine": cosine, "pair_logit": logit, "pair_probability": 1.0 / (1.0 + np.exp(-logit))}


def mean_scores(scores: dict[str, np.ndarray], rows=None) -> dict[str, float]:
  rows = slice(None) if rows is None else np.asarray(rows, int)
  return {k: float(np.mean(v[rows])) for k, v in scores.items()}


@functools.lru_cache(maxsize=4)
def _image_embed_fn(model: DualToken):
  def embed(variables, images):
    quantised = model.apply(variables, images, method=DualToken.encode)["image_embeds"]
    return model.apply(variables, images, method=DualToken.siglip_embedding), quantised
  return jax.jit(embed)


class AlignmentTowers:
  """The tokenizer's SigLIP text and vision towers, as the alignment score uses them. Raises
  (before anything is generated) when the tokenizer has no text tower or no SentencePiece
  model is given."""

  def __init__(self, model: DualToken, variables, sentencepiece_model, mesh=None,
               what: str = "this checkpoint's tokenizer"):
    config = model.config
    if config.text is None or "txt" not in variables.get("params", {}):
      raise ValueError(
          f"the alignment score needs the SigLIP text tower, but {what} has none (its config's "
          "text is None: it was trained or converted without `txt`); use a tokenizer with the "
          "text tower, or pass --no_alignment to skip the score")
    if not sentencepiece_model:
      raise ValueError("the alignment score needs the SigLIP text tower's SentencePiece model "
                       "(--siglip_tokenizer: big_vision's c4_en / mc4 .model or spiece.model "
                       "of the Hugging Face SigLIP repo), or --no_alignment")
    self.model, self.variables = model, variables
    self.mesh = mesh or sharding.single_device_mesh()
    self.size = config.image_size
    self.tokenize = text.SigLIPTokenizer(sentencepiece_model, config.text.max_len,
                                         config.text.vocab_size)
    self.t = np.asarray(variables["params"]["t"], np.float32)
    self.b = np.asarray(variables["params"]["b"], np.float32)

  def texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    return text.encode_texts(self.model, self.variables, self.tokenize(list(texts)), self.mesh,
                             batch_size)

  def images(self, images_u8: Sequence[np.ndarray], batch_size: int = 8):
    """(plain SigLIP, quantised semantic path) L2-normalised embeddings of uint8 images,
    resized and centre-cropped to the tokenizer's size as its inputs always are."""
    x = np.stack([to_float(resize_center_crop(Image.fromarray(i), self.size)) for i in images_u8])
    fn = _image_embed_fn(self.model)
    out = ([], [])
    for start in range(0, len(x), batch_size):
      chunk = x[start:start + batch_size]
      n = len(chunk)
      if n < batch_size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
      for part, emb in zip(out, fn(self.variables, jnp.asarray(chunk))):
        part.append(np.asarray(emb)[:n])
    return tuple(np.concatenate(part) for part in out)


def alignment(towers: AlignmentTowers, prompts: Sequence[str], images_u8, groups=None) -> dict:
  """Mean alignment of each (prompt, image) pair, per image path; by group when given."""
  text_embeds = towers.texts(prompts)
  siglip, quantised = towers.images(images_u8)
  out: dict[str, Any] = {"pairs": len(prompts)}
  for name, image_embeds in (("siglip", siglip), ("quantised", quantised)):
    scores = pair_scores(text_embeds, image_embeds, towers.t, towers.b)
    out[name] = mean_scores(scores)
    if groups is not None:
      by = defaultdict(list)
      for i, g in enumerate(groups):
        by[g].append(i)
      out[name]["by_group"] = {g: mean_scores(scores, rows) for g, rows in sorted(by.items())}
  return out


# ---------------------------------------------------------------- FID
@functools.lru_cache(maxsize=1)
def _inception_fn():
  return jax.jit(steps.inception_module("pil_bicubic").apply)


def inception_features(variables, images_u8: Sequence[np.ndarray],
                       batch_size: int = 8) -> np.ndarray:
  """(N, 2048) pool3 features of uint8 images of any size (clean-fid resize to 299 px)."""
  fn = _inception_fn()
  out = []
  for start in range(0, len(images_u8), batch_size):
    chunk = np.stack([steps.clean_resize(i) for i in images_u8[start:start + batch_size]])
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(fn(variables, jnp.asarray(chunk)))[:n])
  return np.concatenate(out) if out else np.zeros((0, inception.FEATURE_DIM), np.float32)


def _fid(a: np.ndarray, b: np.ndarray) -> float | None:
  if len(a) < 2 or len(b) < 2:
    return None
  return fid.fid_from_features(a, b)


def mjhq_fid(weights, generated: dict[str, list], reference: dict[str, list]) -> dict:
  """FID per category and overall ({category: [uint8 images]} on each side); the features of
  all images are computed in one pass of fixed-size batches."""
  groups = [(side, c, images) for side, d in (("generated", generated), ("reference", reference))
            for c, images in sorted(d.items())]
  feats = inception_features(weights, [i for _, _, images in groups for i in images])
  by, start = {}, 0
  for side, c, images in groups:
    by[side, c] = feats[start:start + len(images)]
    start += len(images)
  empty = np.zeros((0, inception.FEATURE_DIM))
  out = {"by_category": {}}
  for c in sorted(generated):
    g, r = by[("generated", c)], by.get(("reference", c), empty)
    out["by_category"][c] = {"fid": _fid(g, r), "generated": len(g), "reference": len(r)}
  side = lambda name: np.concatenate([f for (s, _), f in by.items() if s == name] or [empty])
  out["fid"] = _fid(side("generated"), side("reference"))
  return out


def read_references(folder: Path, prompts: Sequence[gen.Prompt], data: gen.PromptData):
  """MJHQ's reference images `<folder>/<category>/<id>.jpg` of the prompts ({category: [uint8
  images]}); a missing or undecodable one is skipped and counted."""
  out = defaultdict(list)
  for p in prompts:
    path = Path(folder) / p.meta["category"] / f"{p.pid}.jpg"
    if not path.is_file():
      data.skip("missing", f"reference image {path} not found")
      continue
    try:
      out[p.meta["category"]].append(np.asarray(decode.decode_image(decode.read_image_file(path))))
    except decode.SkipImage as e:
      data.skip(e.reason, f"reference image {path}: {e}")
  return dict(out)


# ---------------------------------------------------------------- the run
def evaluate(model, task: str, data: str | Path, workdir: str | Path, *,
             images: str | Path | None = None, samples_per_prompt: int | None = None,
             batch_size: int = 8, cfg_scale: float | None = 3.0, temperature: float = 1.0,
             top_k: int | None = 900, top_p: float | None = 0.96, seed: int = 0,
             limit: int | None = None, inception_weights_path: str | Path | None = None,
             siglip_tokenizer: str | Path | None = None, alignment_score: bool = True,
             mesh=None, progress: bool = True, out: TextIO | None = None,
             checkpoint: str = "") -> dict[str, Any]:
  """Generates `task`'s images for the prompts of `data` with `model` (a `UnifiedModel`)
  into `workdir/images/` and scores them; returns (and writes to `workdir/metrics.json`)
  {"task", "metrics", "prompts", "images", "generated_this_run", "skipped", ...}."""
  spec = gen.get(task)
  samples = gen.check_samples(spec, samples_per_prompt)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  data = Path(data)
  towers = None
  if alignment_score:
    towers = AlignmentTowers(model.tokenizer, model.tokenizer_variables, siglip_tokenizer, mesh)
  weights = reference = None
  if task == "mjhq":
    if not inception_weights_path:
      raise ValueError("MJHQ's FID needs --inception_weights: the FID Inception-v3 converted "
                       "once with `python -m dualtoken_jax.convert_inception`; weights are never "
                       "downloaded")
    reference = Path(images) if images else data.parent / gen.MJHQ_IMAGES
    if not reference.is_dir():
      raise FileNotFoundError(f"MJHQ reference image folder {reference} not found (the unpacked "
                              f"{gen.MJHQ_IMAGES}/<category>/<id>.jpg; pass --images)")
    weights = inception_weights.load(inception_weights_path)
  read = spec.read(data)
  prompts = read.prompts[:limit] if limit else read.prompts
  if not prompts:
    raise ValueError(f"{data}: no usable {task} prompt (skipped: "
                     f"{ {k: v for k, v in read.skipped.items() if v} })")
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  runner.check_settings(workdir, {
      "task": task, "data": str(data.resolve()), "checkpoint": str(checkpoint),
      "samples_per_prompt": samples, "batch_size": batch_size, "cfg_scale": cfg_scale,
      "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed})
  root = workdir / IMAGES
  generated = _generate(model, spec, prompts, root, samples, batch_size, progress, mesh,
                        dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed))
  started = time.time()
  texts, pictures, groups = [], [], []
  by_category: dict[str, list] = defaultdict(list)
  for p in prompts:
    for image in spec.layout.read(root, p, samples):
      texts.append(p.text)
      pictures.append(image)
      groups.append(p.meta.get("category") or p.meta.get("tag") or "all")
      by_category[p.meta.get("category", "all")].append(image)
  metrics: dict[str, Any] = {}
  if towers is not None:
    metrics["alignment"] = alignment(towers, texts, pictures,
                                     groups if task in ("mjhq", "geneval") else None)
  if task == "mjhq":
    metrics.update(mjhq_fid(weights, dict(by_category), read_references(reference, prompts, read)))
  result = {"task": task, "metrics": metrics, "prompts": len(prompts), "images": len(pictures),
            "samples_per_prompt": samples, "generated_this_run": generated,
            "skipped": {k: v for k, v in read.skipped.items() if v},
            "skip_examples": read.examples, "layout": str(root), "official_scorer": spec.scorer,
            "scoring_seconds": round(time.time() - started, 2)}
  (workdir / runner.METRICS).write_text(json.dumps(result, indent=1))
  print(summary(result), file=out or sys.stdout)
  return result


def _generate(model, spec, prompts, root: Path, samples: int, batch_size: int, progress: bool,
              mesh, options: dict) -> int:
  """Draws the missing prompts' images (module docstring); returns how many prompts it wrote."""
  slots = [(i, k) for i in range(len(prompts)) for k in range(samples)]
  chunks = [slots[s:s + batch_size] for s in range(0, len(slots), batch_size)]
  done = [gen.complete(root, spec.layout, p, samples) for p in prompts]
  pending: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
  written = 0
  with tqdm(total=len(prompts), initial=sum(done), desc=spec.name, unit="prompt",
            disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
    for c, chunk in enumerate(chunks):
      if all(done[i] for i, _ in chunk):
        continue
      drawn = model.generate_images_batch([prompts[i].text for i, _ in chunk], stream=c,
                                          batch_size=batch_size, length_bucket=32, mesh=mesh,
                                          **options)["images"]
      for (i, k), image in zip(chunk, to_uint8(drawn)):
        if not done[i]:
          pending[i][k] = image
      for i in sorted(pending):
        if len(pending[i]) == samples:
          spec.layout.write(root, prompts[i], [pending[i][k] for k in range(samples)])
          del pending[i]
          done[i] = True
          written += 1
          bar.update(1)
  return written


def summary(result: dict) -> str:
  """The one-screen table: counts, FID (mjhq), alignment, the official scorer's command."""
  m = result["metrics"]
  lines = [f"{result['task']}: {result['prompts']} prompts, {result['images']} images "
           f"({result['generated_this_run']} prompts generated this run) in {result['layout']}"
           + (f", skipped {result['skipped']}" if result["skipped"] else "")]
  fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
  if "fid" in m:
    lines.append(f"  {'fid':<24}{fmt(m['fid'])}")
    lines.append("  by category: " + ", ".join(f"{c} {fmt(v['fid'])}"
                                                for c, v in m["by_category"].items())[:200])
  for path in ("siglip", "quantised"):
    if "alignment" in m:
      a = m["alignment"][path]
      lines.append(f"  alignment ({path}): cosine {fmt(a['cosine'])}, pair logit "
                   f"{a['pair_logit']:.3f}, pair probability {fmt(a['pair_probability'])}")
  lines.append(f"  official scorer: {result['official_scorer']}")
  return "\n".join(lines)
