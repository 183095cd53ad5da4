"""The benchmark runner: a model answers a task's questions in batches, resumably, and the
answers are scored as the task's official tool scores them.

    python -m dualtoken_jax.evaluate_mllm --checkpoint RUN --task pope --data DIR --workdir W

Every batch's answers are appended to `W/predictions.jsonl` (one JSON line per question, keyed
by `qid`, flushed and fsync'ed per batch), so a killed run loses at most one batch and a re-run
answers only what is missing (a torn last line is cut off first). `W/run.json` records the
settings; a re-run with different ones is refused instead of mixing answers. At the end
`W/metrics.json` (metrics, counts, skipped records by reason) and a one-screen summary.

Modes: "generate" (greedy, KV-cached: `UnifiedModel.answer_batch`) and, for multiple-choice
tasks, "loglikelihood" (each option text scored after the bare question,
`UnifiedModel.loglikelihood_batch`; the best one's letter is the prediction).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from dualtoken_jax.data import decode
from dualtoken_jax.data.transforms import load_image
from dualtoken_jax.mllm_eval import tasks as tasks_lib
from dualtoken_jax.mllm_eval.scoring import LETTERS

MODES = ("generate", "loglikelihood")
PREDICTIONS, METRICS, SETTINGS = "predictions.jsonl", "metrics.json", "run.json"


def read_predictions(path: Path) -> dict[str, dict]:
  """{qid: line} of a predictions file; a torn last line (a killed write) is cut off the file.
  A bad line anywhere else is an error (the file is not this runner's)."""
  path = Path(path)
  if not path.is_file():
    return {}
  data = path.read_bytes()
  *complete, torn = data.split(b"\n")  # our writes end every line with a newline
  done = {}
  for n, line in enumerate(complete, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}:{n} is not JSON ({e}); the file is not a predictions file of "
                       "this runner") from e
    if not isinstance(row, dict) or "qid" not in row:
      raise ValueError(f"{path}:{n}: a line without 'qid'")
    done[str(row["qid"])] = row
  if torn:
    with path.open("r+b") as f:
      f.truncate(len(data) - len(torn))
  return done


def check_settings(workdir: Path, settings: dict) -> None:
  path = workdir / SETTINGS
  if path.is_file():
    old = json.loads(path.read_text())
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
      raise ValueError(f"{workdir} holds a run with other settings ({diff}: was, now); use a "
                       "new --workdir or delete what it holds (predictions, images, run.json)")
  else:
    path.write_text(json.dumps(settings, indent=1))


def _load(model, item):
  size = model.config.model.tokenizer.image_size
  return None if item.image is None else load_image(item.image, size)


def _answer(model, batch, images, mode, batch_size, max_new_tokens, mesh) -> list[str]:
  if mode == "generate":
    return model.answer_batch([it.prompt for it in batch], images,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, mesh=mesh)
  requests = [(it.question or it.prompt, image, choice)
              for it, image in zip(batch, images) for choice in it.choices]
  width = batch_size * max(len(it.choices) for it in batch)
  scores = model.loglikelihood_batch(requests, batch_size=width, mesh=mesh)
  out, k = [], 0
  for it in batch:
    best = max(range(len(it.choices)), key=lambda i: scores[k + i][0])
    out.append(LETTERS[best])
    k += len(it.choices)
  return out


def evaluate(model, task: str, data: str | Path, workdir: str | Path, *,
             images: str | Path | None = None, style: str = "llava", mode: str = "generate",
             batch_size: int = 8, max_new_tokens: int | None = None, limit: int | None = None,
             mesh=None, progress: bool = True, out: TextIO | None = None,
             checkpoint: str = "") -> dict[str, Any]:
  """Answers and scores `task` on `data` with `model` (a `UnifiedModel`); returns (and
  writes to `workdir/metrics.json`) {"task", "metrics", "answered", "skipped", ...}."""
  spec = tasks_lib.get(task)
  if style not in tasks_lib.STYLES:
    raise ValueError(f"prompt style {style!r} is not one of {tasks_lib.STYLES}")
  if mode not in MODES:
    raise ValueError(f"mode {mode!r} is not one of {MODES}")
  if mode == "loglikelihood" and not spec.multiple_choice:
    raise ValueError(f"the loglikelihood mode ranks options; task {task!r} has none")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  max_new_tokens = max_new_tokens or spec.max_new_tokens
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  read = spec.read(Path(data), Path(images) if images else None, style)
  items = read.items[:limit] if limit else read.items
  if len({it.qid for it in items}) != len(items):
    raise ValueError(f"{data}: question ids are not unique")
  check_settings(workdir, {"task": task, "data": str(Path(data).resolve()), "style": style,
                            "mode": mode, "max_new_tokens": max_new_tokens,
                            "checkpoint": str(checkpoint)})
  path = workdir / PREDICTIONS
  done = read_predictions(path)
  pending = [it for it in items if it.qid not in done]
  started = time.time()
  with path.open("a", encoding="utf-8") as f, tqdm(
      total=len(items), initial=len(items) - len(pending), desc=task, unit="q",
      disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
    for start in range(0, len(pending), batch_size):
      chunk, lines, loaded = pending[start:start + batch_size], [], []
      for it in chunk:
        try:
          loaded.append((it, _load(model, it)))
        except decode.SkipImage as e:
          lines.append({"qid": it.qid, "skip": e.reason, "error": str(e)})
      if loaded:
        answers = _answer(model, [it for it, _ in loaded], [x for _, x in loaded], mode,
                          batch_size, max_new_tokens, mesh)
        lines += [{"qid": it.qid, "prediction": a, **it.meta}
                  for (it, _), a in zip(loaded, answers)]
      f.write("".join(json.dumps(line) + "\n" for line in lines))
      f.flush()
      os.fsync(f.fileno())
      done.update({line["qid"]: line for line in lines})
      bar.update(len(chunk))
  skipped = dict(read.skipped)
  rows = []
  for it in items:
    line = done[it.qid]
    if "skip" in line:
      skipped[line["skip"]] = skipped.get(line["skip"], 0) + 1
    else:
      rows.append(dict(it.meta, prediction=line["prediction"]))
  if not rows:
    raise ValueError(f"no {task} question could be answered (skipped: "
                     f"{ {k: v for k, v in skipped.items() if v} })")
  result = {"task": task, "mode": mode, "style": style, "metrics": spec.score(rows),
            "answered": len(rows), "questions": len(items),
            "skipped": {k: v for k, v in skipped.items() if v},
            "skip_examples": read.examples, "seconds_this_run": round(time.time() - started, 2)}
  (workdir / METRICS).write_text(json.dumps(result, indent=1))
  print(summary(result), file=out or sys.stdout)
  return result


def summary(result: dict) -> str:
  """The one-screen table: the task's headline metrics (then sub-scores one level down)."""
  spec = tasks_lib.get(result["task"])
  metrics = result["metrics"]
  lines = [f"{result['task']} ({result['mode']}, {result['style']} prompts): "
           f"{result['answered']}/{result['questions']} answered"
           + (f", skipped {result['skipped']}" if result["skipped"] else "")]
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) and abs(v) <= 1 else (
      f"{v:.2f}" if isinstance(v, float) else str(v))
  for key in spec.headline:
    if key in metrics:
      lines.append(f"  {key:<24}{fmt(metrics[key])}")
  for group, values in metrics.items():
    if isinstance(values, dict) and len(lines) < 22:
      parts = []
      for k, v in values.items():
        v = v.get("score", v.get("f1")) if isinstance(v, dict) else v
        if isinstance(v, (int, float)):
          parts.append(f"{k} {fmt(v)}")
      if parts:
        lines.append(f"  {group}: " + ", ".join(parts)[:200])
  return "\n".join(lines)
