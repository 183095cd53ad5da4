"""`evaluate(tokenizer, data, workdir, options)`: one streaming, resumable pass over a dataset.

Per batch: the eval pipeline (`data.make_eval_dataset`, this host's share, padded so hosts stay
in lock-step) -> a global array over all devices -> the jitted step (`steps.py`) -> host-side
accumulators (`state.py`). Every `checkpoint_every` batches and at the end the accumulators and
the input iterator's position are saved under `workdir`; a new call with the same settings
continues from there (after a kill, or to rewrite the report of a finished run). The report
(`report.py`) is written by process 0.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
import tqdm

from dualtoken_jax import data
from dualtoken_jax.bridges import inception as inception_weights
from dualtoken_jax.bridges import lpips as lpips_weights
from dualtoken_jax.data.images import to_uint8
from dualtoken_jax.evaluation import (data_spec, gather, report, retrieval, state, steps,
                                      text, zeroshot)
from dualtoken_jax.parallel import sharding
from dualtoken_jax.metrics import fid
from dualtoken_jax.metrics.codebook_stats import CodeHistogram
from dualtoken_jax.models import inception

METRICS = ("rfid", "psnr", "ssim", "lpips", "usage", "zeroshot", "retrieval")
DEFAULT_METRICS = ("rfid", "psnr", "ssim", "usage")
RECON_METRICS = ("rfid", "psnr", "ssim", "lpips")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """Settings of one evaluation (the CLI flags of `python -m dualtoken_jax.evaluate`)."""
  metrics: tuple[str, ...] = DEFAULT_METRICS
  batch_size: int = 64                 # global, a multiple of the device count
  max_images: int | None = None        # the first N records of the source
  inception_weights: str | None = None  # .npz from convert_inception (rfid)
  fid_resize: str = "bilinear"         # see steps.py
  jpeg_quality: int | None = None      # JPEG round trip of both rFID sides (reference: 95)
  lpips_weights: str | None = None     # .npz from convert_lpips (lpips)
  sentencepiece_model: str | None = None  # SigLIP's .model (zeroshot, retrieval)
  class_names: str | None = None       # one per line; None = the 1000 ImageNet classes
  labels: str | None = None            # KEY,LABEL file (otherwise from folders / records)
  captions: str | None = None          # Flickr captions.txt (retrieval)
  image_key: str = "image"             # ArrayRecord/TFDS features
  label_key: str = "label"
  key_feature: str | None = None
  tfds_data_dir: str | None = None
  num_extremes: int = 8                # worst and best reconstructions in the PNG
  checkpoint_every: int = 25           # batches between saves
  num_threads: int = 8                 # image decoding threads per host
  text_batch_size: int = 256
  plots: bool = True                   # write the PNG files of the report
  progress: bool = True

  def validate(self) -> None:
    unknown = sorted(set(self.metrics) - set(METRICS))
    if unknown or not self.metrics:
      raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    if "rfid" in self.metrics and not self.inception_weights:
      raise ValueError("rfid needs --inception_weights: the FID Inception-v3 "
                       "(pt_inception-2015-12-05-6726825d.pth of pytorch-fid) converted once "
                       "with `python -m dualtoken_jax.convert_inception --input … --output "
                       "inception_fid.npz`; weights are never downloaded")
    if "lpips" in self.metrics and not self.lpips_weights:
      lpips_weights.load(None)  # raises with the conversion recipe
    if ({"zeroshot", "retrieval"} & set(self.metrics)) and not self.sentencepiece_model:
      raise ValueError("zeroshot/retrieval need --sentencepiece_model, the SentencePiece .model "
                       "of the SigLIP checkpoint")
    if "retrieval" in self.metrics and not self.captions:
      raise ValueError("retrieval needs --captions (a Flickr8K/30K captions.txt)")
    if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
    if self.fid_resize not in steps.FID_RESIZE:
      raise ValueError(f"fid_resize must be one of {steps.FID_RESIZE}, got {self.fid_resize!r}")
    if self.batch_size <= 0 or self.checkpoint_every <= 0:
      raise ValueError("batch_size and checkpoint_every must be positive")


def evaluate(tokenizer, data_spec_or_source: str | data_spec.EvalSource, workdir: str,
             options: EvalOptions = EvalOptions(), *, tokenizer_id: str | None = None,
             after_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Evaluates `tokenizer` (a `DualTokenizer`) and writes the report under `workdir`.

  Args:
    tokenizer: the tokenizer (its `model`, `variables` and `config` are used).
    data_spec_or_source: a `--data` spec string (`data_spec.py`) or an opened `EvalSource`.
    workdir: where the report and the resumable state go.
    options: `EvalOptions`.
    tokenizer_id: where the weights came from, for the report and the resume fingerprint
      (default: a digest of the config); the fingerprint also holds a digest of the weights themselves, so a
      checkpoint that changed under the same path is never mixed with the old results.
    after_batch: called with the number of batches done after each batch (tests, logging).

  Returns:
    The metrics written to `workdir/metrics.json`.
  """
  options.validate()
  metrics = set(options.metrics)
  if {"zeroshot", "retrieval"} & metrics:
    text.check_text_tower(tokenizer.config)
  src = data_spec_or_source
  if isinstance(src, str):
    src = data_spec.open_source(
        src, with_labels="zeroshot" in metrics, labels_file=options.labels,
        image_key=options.image_key, label_key=options.label_key,
        key_feature=options.key_feature, max_images=options.max_images,
        tfds_data_dir=options.tfds_data_dir)
  os.makedirs(workdir, exist_ok=True)
  ctx = _Context.build(tokenizer, src, options)
  process = jax.process_index()

  # ---------------------------------------------------------------- resume
  fingerprint = _fingerprint(tokenizer, tokenizer_id, src, options, ctx.class_names)
  position = state.common_position(state.saved_positions(workdir, process))
  state.discard_after(workdir, process, position)  # a host that got further than the others
  acc = (state.load(workdir, process, position, fingerprint) if position is not None
         else _fresh(tokenizer.config, options, ctx.spec.recon))
  host_batch = data.host_batch_size(options.batch_size, ctx.mesh)
  num_batches = data.eval_num_batches(len(src), host_batch, jax.process_count())
  it = iter(data.make_eval_dataset(src.source, batch_size=host_batch,
                                   resolution=tokenizer.config.image_size,
                                   num_threads=options.num_threads))
  if acc.iterator_state is not None:
    it.set_state(acc.iterator_state)

  # ---------------------------------------------------------------- the pass
  bar = tqdm.tqdm(total=num_batches, initial=acc.position, unit="batch", desc="evaluate",
                  disable=not options.progress or process != 0, dynamic_ncols=True)
  try:
    while acc.position < num_batches:
      start = time.perf_counter()
      ctx.run_batch(next(it), acc)
      acc.position += 1
      acc.elapsed_s += time.perf_counter() - start
      bar.update(1)
      bar.set_postfix_str(f"{acc.position * options.batch_size / acc.elapsed_s:.1f} img/s",
                          refresh=False)
      if acc.position % options.checkpoint_every == 0 or acc.position == num_batches:
        acc.iterator_state = it.get_state()
        state.save(acc, workdir, process, fingerprint)
      if after_batch is not None:
        after_batch(acc.position)
  finally:
    bar.close()
    ctx.close()

  # ---------------------------------------------------------------- report
  loaded = state.load_rows(workdir, acc)
  local_rows = {name: loaded.get(name, np.zeros((0,) + shape, dtype))  # same columns everywhere
                for name, (dtype, shape) in ctx.columns(tokenizer.config).items()}
  results, rows, extremes = report.summarize(
      acc, local_rows, options=options, source=src, class_names=ctx.class_names,
      fingerprint=fingerprint, image_shape=(tokenizer.config.image_size,) * 2 + (3,))
  if "retrieval" in metrics:
    results["retrieval"] = _retrieval(ctx, local_rows, options)
  if process == 0:
    report.write_all(workdir, results, rows, extremes, acc, plots=options.plots)
  return results


@dataclasses.dataclass
class _Context:
  """What every batch needs: the mesh, the jitted steps and the replicated weights."""
  options: EvalOptions
  mesh: Any
  model: Any
  spec: steps.StepSpec
  step: Callable
  tok_vars: Any
  class_names: tuple[str, ...] | None = None
  classifier: Any = None
  captions: list[tuple[str, str]] | None = None
  text_tokenizer: text.SigLIPTokenizer | None = None
  inception_vars: Any = None
  lpips_params: Any = None
  host_fid: bool = False
  pool: concurrent.futures.ThreadPoolExecutor | None = None

  @classmethod
  def build(cls, tokenizer, src: data_spec.EvalSource, options: EvalOptions) -> "_Context":
    metrics, cfg = set(options.metrics), tokenizer.config
    mesh = sharding.make_mesh({"data": -1})  # all devices on the data axis
    ctx = cls(options, mesh, steps.canonical_model(cfg), steps.StepSpec(), None,
              steps.replicate(tokenizer.variables, mesh))
    if {"zeroshot", "retrieval"} & metrics:
      ctx.text_tokenizer = text.SigLIPTokenizer(options.sentencepiece_model, cfg.text.max_len,
                                                cfg.text.vocab_size)
    if "zeroshot" in metrics:
      ctx.class_names = zeroshot.load_class_names(options.class_names)
      zeroshot.check_class_names(ctx.class_names, src.num_classes, src.class_folders,
                                 src.description)
      ctx.classifier = steps.replicate(zeroshot.build_classifier(
          ctx.model, ctx.tok_vars, ctx.text_tokenizer, ctx.class_names, mesh,
          batch_size=options.text_batch_size), mesh)
    if "retrieval" in metrics:
      ctx.captions = data_spec.read_captions(options.captions)
    if "rfid" in metrics:
      ctx.inception_vars = steps.replicate(_load_inception(options.inception_weights), mesh)
      ctx.host_fid = options.jpeg_quality is not None or options.fid_resize == "pil_bicubic"
      if ctx.host_fid:
        ctx.pool = concurrent.futures.ThreadPoolExecutor(max(1, options.num_threads))
    if "lpips" in metrics:
      ctx.lpips_params = steps.replicate(lpips_weights.load(options.lpips_weights), mesh)
    ctx.spec = steps.StepSpec(
        recon=bool(metrics & set(RECON_METRICS)), ssim="ssim" in metrics,
        usage="usage" in metrics, embeds=bool({"zeroshot", "retrieval"} & metrics),
        topk=min(5, len(ctx.class_names)) if ctx.class_names else 0)
    ctx.step = steps.main_step(ctx.model, ctx.spec, mesh)
    return ctx

  def columns(self, cfg) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """{name: (dtype, trailing shape)} of the per-image rows this run records."""
    f32, i32 = np.float32, np.int32
    cols = {"key": (str, ())}
    if self.spec.recon:
      cols["psnr"] = (f32, ())
    if self.spec.ssim:
      cols["ssim"] = (f32, ())
    if self.lpips_params is not None:
      cols["lpips"] = (f32, ())
    if self.spec.topk:
      cols.update(label=(i32, ()), topk_q=(i32, (self.spec.topk,)),
                  topk_t=(i32, (self.spec.topk,)))
    if "retrieval" in self.options.metrics:
      dim = cfg.vision.width
      cols.update(emb_q=(f32, (dim,)), emb_t=(f32, (dim,)))
    return cols

  def close(self) -> None:
    if self.pool is not None:
      self.pool.shutdown()

  def run_batch(self, batch: dict[str, Any], acc: state.Accumulators) -> None:
    """One pipeline batch (this host's rows) through the device steps into `acc`."""
    opts, mesh = self.options, self.mesh
    mask = np.asarray(batch["mask"], bool)
    split = [data_spec.split_key(k) for k in np.asarray(batch["key"]).tolist()]
    keys = np.array([k for k, _ in split], dtype=str)
    acc.add_skips(batch["skipped"], [k for k, m in zip(keys, mask) if not m and k])
    labels = None
    if self.spec.topk:
      labels = np.array([-1 if lab is None else lab for _, lab in split], np.int32)
      zeroshot.check_labels(labels[mask], keys[mask], len(self.class_names))

    images = np.asarray(batch["image"], np.float32)
    images_g = data.make_global_array(images, mesh)
    out = self.step(self.tok_vars, self.classifier, images_g, data.make_global_array(mask, mesh))
    if self.lpips_params is not None:
      out["lpips"] = steps.lpips_step(mesh)(self.lpips_params, images_g, out["recon"])

    cols: dict[str, np.ndarray] = {"key": keys[mask]}
    for name in ("psnr", "ssim", "lpips", "topk_q", "topk_t"):
      if name in out:
        cols[name] = steps.local_rows(out[name])[mask]
    if labels is not None:
      cols["label"] = labels[mask]
    if "retrieval" in opts.metrics:
      cols["emb_q"] = steps.local_rows(out["emb_q"])[mask]
      cols["emb_t"] = steps.local_rows(out["emb_t"])[mask]
    acc.add_rows(**cols)
    for name in ("pix", "sem"):
      if f"hist_{name}" in out:  # a global sum, identical on every process
        getattr(acc, f"hist_{name}").add_counts(steps.replicated_value(out[f"hist_{name}"]))
    if not self.spec.recon:
      return

    x_u8 = to_uint8(images)  # exact: 8-bit inputs
    fetched = {}

    def recon_u8():  # copied from the devices only when needed
      if "y" not in fetched:
        fetched["y"] = to_uint8(steps.local_rows(out["recon"]))
      return fetched["y"]

    if "rfid" in opts.metrics:
      features = steps.features_step(opts.fid_resize, mesh)
      if self.host_fid:
        sides = [data.make_global_array(steps.prepare_fid_images(
            u8, opts.jpeg_quality, opts.fid_resize, self.pool), mesh) for u8 in (x_u8, recon_u8())]
      else:
        sides = steps.eight_bit_step(mesh)(images_g, out["recon"])
      real, fake = (steps.local_rows(features(self.inception_vars, side)) for side in sides)
      acc.fid_real.update(real[mask])
      acc.fid_fake.update(fake[mask])
    acc.extremes.offer(keys[mask], cols["psnr"],
                       lambda rows: (x_u8[mask][rows], recon_u8()[mask][rows]))


@functools.lru_cache(maxsize=1)
def _inception_file(path: str, mtime_ns: int, size: int):
  del mtime_ns, size  # cache keys: a rewritten file is read again
  return inception_weights.load(path)


def _load_inception(path: str):
  st = os.stat(path)
  return _inception_file(os.path.abspath(path), st.st_mtime_ns, st.st_size)


def _fresh(cfg, options: EvalOptions, recon: bool) -> state.Accumulators:
  metrics = set(options.metrics)
  acc = state.Accumulators()
  if "rfid" in metrics:
    acc.fid_real = fid.GaussianStats.zeros(inception.FEATURE_DIM)
    acc.fid_fake = fid.GaussianStats.zeros(inception.FEATURE_DIM)
  if "usage" in metrics:
    acc.hist_pix = CodeHistogram.zeros(cfg.vq_pix.depth, cfg.vq_pix.codebook_size)
    acc.hist_sem = CodeHistogram.zeros(cfg.vq_sem.depth, cfg.vq_sem.codebook_size)
  if recon:
    acc.extremes = state.Extremes(options.num_extremes)
  return acc


def _retrieval(ctx: _Context, rows: dict[str, np.ndarray], options: EvalOptions) -> dict:
  keys = gather.concat_strings(rows["key"]).tolist()
  embeds = {"quantized": gather.concat(rows["emb_q"]), "teacher": gather.concat(rows["emb_t"])}
  lookup = data_spec.match_caption_images(ctx.captions, keys)
  return retrieval.evaluate_retrieval(ctx.model, ctx.tok_vars, ctx.text_tokenizer,
                                      ctx.mesh, keys, embeds, ctx.captions, lookup,
                                      options.text_batch_size)


def _fingerprint(tokenizer, tokenizer_id, src, options, class_names) -> dict:
  """What was evaluated: the weights (a digest of their bytes), the model config, the data and
  the settings. Recorded in metrics.json ("settings"); resuming needs an identical one."""
  digest = lambda s: hashlib.sha1(s.encode("utf-8")).hexdigest()[:16]
  opts = dataclasses.asdict(options)
  for volatile in ("checkpoint_every", "num_threads", "plots", "progress", "text_batch_size"):
    opts.pop(volatile)
  opts["metrics"] = sorted(opts["metrics"])
  config = digest(tokenizer.config.to_json_best_effort(sort_keys=True))
  return json.loads(json.dumps(dict(
      tokenizer=tokenizer_id or config, model_config=config,
      weights=weights_digest(tokenizer.variables), image_size=tokenizer.config.image_size,
      data=src.description, num_records=len(src), process_count=jax.process_count(),
      class_list=digest("\n".join(class_names)) if class_names else None, **opts)))


def weights_digest(variables) -> str:
  """sha256 (first 32 hex digits) over the paths, dtypes, shapes and bytes of every leaf of
  `variables`: a second or two for a SO400M tokenizer, nothing next to an evaluation pass."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode("utf-8"))
    h.update(a.reshape(-1).view(np.uint8).data)
  return h.hexdigest()[:32]
