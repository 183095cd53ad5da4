"""Evaluate a DualToken tokenizer: rFID, PSNR, SSIM, LPIPS, codebook usage, zero-shot, retrieval.

  python -m dualtoken_jax.evaluate --config configs/dualtoken_so400m.py --checkpoint TOK_DIR \\
      --data folder:/data/imagenet/val --workdir /tmp/eval_in1k \\
      --metrics rfid,psnr,ssim,usage,zeroshot --inception_weights inception_fid.npz \\
      --sentencepiece_model siglip_c4_en.model --batch_size 256

  python -m dualtoken_jax.evaluate --reference dualtoken.pt --data Flickr8k/Images \\
      --captions Flickr8k/captions.txt --metrics retrieval --sentencepiece_model spiece.model \\
      --workdir /tmp/eval_flickr8k

Tokenizer: --checkpoint (this project's format) or --reference (the PyTorch checkpoint); a
--config given with either names the experiment config: its `evaluation` section (if any)
supplies defaults for these flags, and differences between its `model` and the checkpoint's
own config are reported (the checkpoint's config is used). --config alone evaluates a
randomly initialised model (smoke runs).

--data: sample | DIR | folder:DIR | tar:PATTERN | arrayrecord:PATTERN | tfds:NAME[:SPLIT].
Images get the eval geometry (shorter side -> image_size, bicubic, centre crop). Zero-shot
labels come from class subfolders, the records' `label` feature, or --labels FILE; the class
names default to the 1000 ImageNet classes (--class_names FILE: one per label id).

The run is resumable: rerunning the same command continues from the last checkpoint under
--workdir (every --checkpoint_every batches). What was evaluated (the checkpoint's resolved
step directory, a digest of the weights, the data, the settings) is recorded in metrics.json
("settings"); a rerun whose weights or settings differ (e.g. a training workdir that gained a
newer step) is refused with exit status 2 instead of mixing the two: use a new --workdir.
Report: WORKDIR/metrics.json, per_image.csv, reconstructions.png, codebook_{pixel,semantic}.png.
Unreadable images are counted, listed in metrics.json and skipped.

Several processes (`python -m dualtoken_jax.launch … -- dualtoken_jax.evaluate …`, or one per
host of a pod with --distributed) each read their share of the records onto their own devices
of one global mesh; metrics.json equals a one-process run's except for "throughput" and
"settings.process_count" (per_image.csv lists the rows in process order). Only process 0 writes
the report; each process keeps its own resumable state, and a rerun resumes all of them from
the newest position every process saved (with the same process count).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

from dualtoken_jax import config_files
from dualtoken_jax.cli import tokenizer_flags as tokenizer_source
from dualtoken_jax.evaluation import runner
from dualtoken_jax.evaluation import state
from dualtoken_jax.parallel import distributed
from dualtoken_jax.training import checkpoints


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  tokenizer_source.add_flags(p)
  d = runner.EvalOptions()
  p.add_argument("--data", required=True, help="data spec (see above)")
  p.add_argument("--workdir", required=True, help="report and resumable state go here")
  p.add_argument("--metrics", default=",".join(d.metrics),
                 help=f"comma-separated subset of {','.join(runner.METRICS)}")
  p.add_argument("--batch_size", type=int, default=d.batch_size,
                 help="global batch, a multiple of the number of devices")
  p.add_argument("--max_images", type=int, help="evaluate only the first N records")
  g = p.add_argument_group("rFID")
  g.add_argument("--inception_weights", help=".npz from python -m dualtoken_jax.convert_inception")
  g.add_argument("--fid_resize", default=d.fid_resize, choices=("bilinear", "pil_bicubic", "none"),
                 help="299x299 resize: bilinear in the jitted step (pytorch-fid), pil_bicubic on "
                      "the host (clean-fid, the reference's tool), none (smoke tests only)")
  g.add_argument("--jpeg_quality", type=int,
                 help="JPEG round trip of both rFID sides at this quality (the reference saves "
                      "both as JPEG, OpenCV default quality 95); off by default")
  p.add_argument("--lpips_weights", help=".npz from python -m dualtoken_jax.convert_lpips")
  g = p.add_argument_group("zero-shot and retrieval")
  g.add_argument("--sentencepiece_model", help="the SigLIP checkpoint's SentencePiece .model")
  g.add_argument("--class_names", help="one class name per label id (default: ImageNet-1K)")
  g.add_argument("--labels", help="KEY,LABEL lines, for sources without labels")
  g.add_argument("--captions", help="Flickr8K/30K captions.txt (image,caption CSV)")
  g = p.add_argument_group("records (ArrayRecord / TFDS)")
  g.add_argument("--image_key", default=d.image_key)
  g.add_argument("--label_key", default=d.label_key)
  g.add_argument("--key_feature", help="feature naming each record, e.g. file_name")
  g.add_argument("--tfds_data_dir")
  g = p.add_argument_group("run")
  g.add_argument("--num_extremes", type=int, default=d.num_extremes,
                 help="worst and best reconstructions shown in reconstructions.png")
  g.add_argument("--checkpoint_every", type=int, default=d.checkpoint_every,
                 help="batches between saves of the resumable state")
  g.add_argument("--num_threads", type=int, default=d.num_threads, help="decoding threads")
  g.add_argument("--no_plots", action="store_true", help="skip the PNG files of the report")
  g.add_argument("--no_progress", action="store_true")
  g.add_argument("--distributed", action="store_true",
                 help="join a multi-host job that jax.distributed.initialize() auto-detects "
                      "(Cloud TPU, SLURM); under python -m dualtoken_jax.launch it joins anyway")
  return p


def options_from_args(args: argparse.Namespace) -> runner.EvalOptions:
  return runner.EvalOptions(
      metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
      batch_size=args.batch_size, max_images=args.max_images,
      inception_weights=args.inception_weights, fid_resize=args.fid_resize,
      jpeg_quality=args.jpeg_quality, lpips_weights=args.lpips_weights,
      sentencepiece_model=args.sentencepiece_model, class_names=args.class_names,
      labels=args.labels, captions=args.captions, image_key=args.image_key,
      label_key=args.label_key, key_feature=args.key_feature, tfds_data_dir=args.tfds_data_dir,
      num_extremes=args.num_extremes, checkpoint_every=args.checkpoint_every,
      num_threads=args.num_threads, plots=not args.no_plots, progress=not args.no_progress)


def load_tokenizer(args: argparse.Namespace):
  """The tokenizer, and an id naming its weights for the resume fingerprint."""
  if args.checkpoint and not (Path(args.checkpoint) / "config.json").is_file():
    # A training run: name (and load) the step it resolves to now, not the workdir.
    args = argparse.Namespace(**{**vars(args),
                                 "checkpoint": str(checkpoints.latest_step_dir(args.checkpoint))})
  if args.config and (args.checkpoint or args.reference):
    experiment = config_files.load(args.config)
    tok = tokenizer_source.load(argparse.Namespace(**{**vars(args), "config": None}))
    for line in config_differences(config_files.model_of(experiment), tok.config):
      print(f"note: {args.config} differs from the checkpoint's config ({line}); "
            "the checkpoint's is used", file=sys.stderr)
  else:
    tok = tokenizer_source.load(args)
  source = args.checkpoint or args.reference or f"{args.config} (random init, seed {args.seed})"
  return tok, source


def config_differences(a, b, prefix: str = "") -> list[str]:
  """'path: a vs b' for every leaf of two nested configs that differs."""
  a = a.to_dict() if hasattr(a, "to_dict") else a
  b = b.to_dict() if hasattr(b, "to_dict") else b
  out = []
  for k in sorted(set(a) | set(b)):
    x, y = a.get(k), b.get(k)
    if isinstance(x, dict) and isinstance(y, dict):
      out += config_differences(x, y, f"{prefix}{k}.")
    elif (list(x) if isinstance(x, tuple) else x) != (list(y) if isinstance(y, tuple) else y):
      out.append(f"{prefix}{k}: {x!r} vs {y!r}")
  return out


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  pre, _ = parser.parse_known_args(argv)
  if pre.config and (pre.checkpoint or pre.reference):
    section = config_files.load(pre.config).get("evaluation")
    if section:
      known = {a.dest for a in parser._actions}  # pylint: disable=protected-access
      unknown = sorted(set(section) - known)
      if unknown:
        parser.error(f"{pre.config}: unknown keys in its evaluation section: {unknown}")
      parser.set_defaults(**{k: (",".join(v) if k == "metrics" and not isinstance(v, str) else v)
                             for k, v in section.items()})
  args = parser.parse_args(argv)
  options = options_from_args(args)
  try:
    options.validate()
  except ValueError as e:
    parser.error(str(e))
  distributed.initialize(args.distributed)  # before anything touches a device
  tok, source = load_tokenizer(args)
  try:
    results = runner.evaluate(tok, args.data, args.workdir, options, tokenizer_id=source)
  except state.FingerprintMismatch as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:  # every process holds the same results; process 0 wrote them
    print(summary_lines(results))
    print(f"report written to {args.workdir}")
  return 0


def summary_lines(results: dict) -> str:
  lines = [f"images: {results['num_images']} of {results['num_records']} records"]
  bad = results["unreadable"]
  if bad["count"]:
    lines.append(f"unreadable: {bad['count']} ({json.dumps(bad['by_reason'])}), listed in "
                 "metrics.json")
  for name in ("rfid", "psnr", "ssim", "lpips"):
    if name in results:
      lines.append(f"{name}: {results[name]:.4f}")
  for quantiser, levels in results.get("codebook", {}).items():
    a = levels["all"]
    lines.append(f"{quantiser} codes: {a['codes_used']:.0f} used, normalised entropy "
                 f"{a['normalized_entropy']:.4f}, perplexity {a['perplexity']:.1f}")
  zs = results.get("zeroshot")
  if zs:
    for path in ("quantized", "teacher"):
      lines.append(f"zero-shot {path}: " + ", ".join(f"{k} {v:.2f}%" for k, v in zs[path].items()))
  rt = results.get("retrieval")
  if rt:
    for path in ("quantized", "teacher"):
      lines.append(f"retrieval {path}: " + ", ".join(f"{k} {v:.2f}" for k, v in rt[path].items()))
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
