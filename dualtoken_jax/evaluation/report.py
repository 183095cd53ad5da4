"""Final metrics from the accumulators, and the report files.

Written under the workdir by process 0:

  metrics.json            every number, the unreadable images, the settings (`summarize`)
  per_image.csv           key, psnr, ssim[, lpips][, label, pred_quantized, pred_teacher]
  reconstructions.png     the `num_extremes` lowest-PSNR (top) and highest-PSNR (bottom)
                          images: input | reconstruction, with key and PSNR
  codebook_pixel.png      per-level code histograms of each quantiser (`usage`)
  codebook_semantic.png
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dualtoken_jax.data import records
from dualtoken_jax.evaluation import gather, imagenet_classes, state, zeroshot
from dualtoken_jax.metrics import codebook_stats, fid
from dualtoken_jax.data.images import side_by_side

PER_IMAGE_CSV = "per_image.csv"
METRICS_JSON = "metrics.json"
RECON_PNG = "reconstructions.png"


def summarize(acc: state.Accumulators, rows: dict[str, np.ndarray], *, options, source,
              class_names, fingerprint, image_shape
              ) -> tuple[dict[str, Any], dict[str, np.ndarray], state.Extremes | None]:
  """All metrics over every process's images (a collective on several hosts: every process
  passes the same row columns, possibly empty).

  Returns:
    (metrics, the per-image rows of all processes, the overall worst/best reconstructions).
  """
  rows = _gathered(rows)
  n = int(len(rows.get("key", ())))
  counts = np.array([[acc.skipped.get(r, 0) for r in records.SKIP_REASONS]], np.int32)
  skipped = dict(zip(records.SKIP_REASONS, gather.concat(counts).sum(axis=0).tolist()))
  skipped_keys = gather.concat_strings(acc.skipped_keys).tolist()
  out: dict[str, Any] = {
      "num_records": len(source),
      "num_images": n,
      "unreadable": {"count": sum(skipped.values()),
                     "by_reason": {r: c for r, c in skipped.items() if c},
                     "keys": skipped_keys},
  }
  metrics = set(options.metrics)
  if "rfid" in metrics:
    real, fake = acc.fid_real, acc.fid_fake
    if _multi_process():
      real, fake = fid.allgather_stats(real), fid.allgather_stats(fake)
    out["rfid"] = fid.fid_from_stats(real, fake) if real.count >= 2 else float("nan")
  for name in ("psnr", "ssim", "lpips"):
    if name in metrics:
      out[name] = _mean(rows[name]) if n else float("nan")
  if "usage" in metrics:
    out["codebook"] = {q: _usage(getattr(acc, f"hist_{s}").counts)
                       for q, s in (("pixel", "pix"), ("semantic", "sem"))}
  if "zeroshot" in metrics:
    acc_q = zeroshot.accuracy(rows["topk_q"], rows["label"]) if n else {}
    acc_t = zeroshot.accuracy(rows["topk_t"], rows["label"]) if n else {}
    out["zeroshot"] = {
        "quantized": acc_q, "teacher": acc_t,
        "top1_drop": acc_t.get("top1", math.nan) - acc_q.get("top1", math.nan),
        "num_images": n, "num_classes": len(class_names),
        "num_templates": len(imagenet_classes.TEMPLATES)}
  out["throughput"] = {"elapsed_s": acc.elapsed_s,
                       "images_per_s": (acc.position * options.batch_size / acc.elapsed_s
                                        if acc.elapsed_s else float("nan"))}
  out["settings"] = fingerprint
  return out, rows, _gathered_extremes(acc.extremes, image_shape)


def _multi_process() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count() > 1


def _mean(x) -> float:
  return float(np.mean(np.asarray(x, np.float64)))


def _usage(counts: np.ndarray) -> dict[str, dict[str, float]]:
  stats = codebook_stats.usage_stats(counts, pooled=True)
  depth = counts.shape[0]
  levels = [f"level_{d}" for d in range(depth)] + ["all"]
  return {lvl: {k: float(v[i]) for k, v in stats.items()} for i, lvl in enumerate(levels)}


def _gathered(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for k in sorted(rows):
    if k.startswith("emb_"):
      continue  # gathered by retrieval only when needed
    out[k] = gather.concat_strings(rows[k]) if k == "key" else gather.concat(rows[k])
  return out


def _gathered_extremes(ex: state.Extremes | None, image_shape) -> state.Extremes | None:
  if ex is None or not _multi_process():
    return ex
  empty = np.zeros((0,) + tuple(image_shape), np.uint8)
  originals = gather.concat(ex.originals if ex.originals is not None else empty)
  recons = gather.concat(ex.recons if ex.recons is not None else empty)
  merged = state.Extremes(ex.n)
  merged.offer(gather.concat_strings(ex.keys), gather.concat(ex.psnr),
               lambda r: (originals[r], recons[r]))
  return merged


# ---------------------------------------------------------------- files
def write_all(workdir: str, results: dict[str, Any], rows: dict[str, np.ndarray],
              extremes: state.Extremes | None, acc: state.Accumulators,
              plots: bool = True) -> None:
  write_metrics_json(os.path.join(workdir, METRICS_JSON), results)
  if "key" in rows:
    write_per_image_csv(os.path.join(workdir, PER_IMAGE_CSV), rows)
  if not plots:
    return
  if extremes is not None and len(extremes.keys):
    write_extremes_png(os.path.join(workdir, RECON_PNG), extremes)
  if acc.hist_pix is not None:
    codebook_stats.write_histogram_pngs({"pixel": acc.hist_pix, "semantic": acc.hist_sem},
                                        workdir)


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return None if not math.isfinite(float(x)) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_metrics_json(path: str, results: dict[str, Any]) -> None:
  """Strict JSON (NaN / inf written as null), written atomically."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(_jsonable(results), f, indent=2, allow_nan=False)
    f.write("\n")
  os.replace(tmp, path)


def write_per_image_csv(path: str, rows: dict[str, np.ndarray]) -> None:
  columns = [("key", rows["key"])]
  for name in ("psnr", "ssim", "lpips", "label"):
    if name in rows:
      columns.append((name, rows[name]))
  for path_name, col in (("quantized", "topk_q"), ("teacher", "topk_t")):
    if col in rows:
      columns.append((f"pred_{path_name}", rows[col][:, 0]))
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)
    w.writerow([name for name, _ in columns])
    for i in range(len(rows["key"])):
      w.writerow([_cell(values[i]) for _, values in columns])
  os.replace(tmp, path)


def _cell(v):
  if isinstance(v, (np.floating, float)):
    return f"{float(v):.6f}"
  return str(v)


def write_extremes_png(path: str, ex: state.Extremes, columns: int = 2) -> None:
  """Two titled grids (lowest PSNR first, then highest) of input | reconstruction pairs."""
  worst, best = ex.ranked()
  sheets = []
  for title, order in (("lowest PSNR", worst), ("highest PSNR", best)):
    captions = [f"{i + 1}. {_short(ex.keys[r])}  {ex.psnr[r]:.2f} dB" for i, r in enumerate(order)]
    sheets.append((title, side_by_side(ex.originals[order], ex.recons[order], captions, columns)))
  width = max(s.width for _, s in sheets)
  strip = 18
  out = Image.new("RGB", (width, sum(s.height + strip for _, s in sheets)), "white")
  draw, y = ImageDraw.Draw(out), 0
  for title, sheet in sheets:
    draw.text((4, y + 3), f"{title} (input | reconstruction)", fill="black")
    out.paste(sheet, (0, y + strip))
    y += sheet.height + strip
  out.save(path)


def _short(key: str, limit: int = 28) -> str:
  key = str(key)
  return key if len(key) <= limit else "…" + key[-(limit - 1):]
