"""The generation benchmarks: each task's prompt files read in their real layout, and the folder
layout its official scorer reads the generated images from.

| task | `--data` | images written (under `WORKDIR/images/`) | official scorer |
|---|---|---|---|
| `mjhq` | MJHQ-30K `meta_data.json` ({id: {"prompt", "category", ...}}) | `<category>/<id>.png` | FID here (reference images `<category>/<id>.jpg`, default `DATA/../mjhq30k_imgs`) |
| `geneval` | GenEval `evaluation_metadata.jsonl` (one JSON per line: "prompt", "tag", ...) | `<index:05d>/metadata.jsonl` (that line) + `<index:05d>/samples/<k:04d>.png` | `evaluation/evaluate_images.py` (Mask2Former + CLIP) |
| `genai_bench` | GenAI-Bench `genai_image.json` ({"00000": {"prompt", ...}} or a list of {"id", "prompt"}) | `<id:05d>.jpeg` | t2v_metrics `genai_bench/evaluate.py` (VQAScore, CLIP-FlanT5) |
| `dpg_bench` | DPG-Bench `prompts/` (one `<name>.txt` per prompt) | `<name>.png`: the samples as a 2x2 grid | ELLA `dpg_bench/compute_dpg_bench.py` (mPLUG) |

A record that cannot be used (no prompt text, a duplicate id, an unreadable prompt file) is
skipped and counted ("bad_record"), as `tasks.py` does for the understanding tasks. Every file
is written under a temporary name and renamed, so a killed run never leaves a torn image that
a resumed run (or the official scorer) would take for a finished one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from dualtoken_jax.mllm_eval import tasks as tasks_lib

MJHQ_IMAGES = "mjhq30k_imgs"


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt: `pid` (unique in the task, names its output files), the text, and `meta`
  (what the layout writes beside the images / what scores group by, e.g. the category)."""
  pid: str
  text: str
  meta: dict


class PromptData:
  """Prompts and the {reason: count} of records skipped while reading."""

  def __init__(self):
    self.prompts: list[Prompt] = []
    self.skipped = {name: 0 for name in tasks_lib.SKIPS.names}
    self.examples: dict[str, str] = {}
    self._ids: set[str] = set()

  def skip(self, reason: str, what: str) -> None:
    tasks_lib.SKIPS.index(reason)
    self.skipped[reason] += 1
    self.examples.setdefault(reason, what)

  def add(self, pid, text, meta: dict, where: str) -> None:
    if not isinstance(text, str) or not text.strip():
      self.skip("bad_record", f"{where}: no prompt text")
    elif str(pid) in self._ids:
      self.skip("bad_record", f"{where}: duplicate id {pid!r}")
    else:
      self._ids.add(str(pid))
      self.prompts.append(Prompt(str(pid), text.strip(), meta))


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _safe(name, what: str, data: PromptData) -> bool:
  """Ids become file names: anything that could leave the output folder is skipped."""
  if isinstance(name, str) and _SAFE_NAME.match(name) and ".." not in name:
    return True
  data.skip("bad_record", f"{what}: {name!r} is not usable as a file name")
  return False


# ---------------------------------------------------------------- readers
def read_mjhq(path: Path) -> PromptData:
  """MJHQ-30K's `meta_data.json`: {image id: {"prompt", "category", ...}}, in file order."""
  doc = tasks_lib._read_json(Path(path))  # pylint: disable=protected-access
  if not isinstance(doc, dict):
    raise ValueError(f"{path}: expected MJHQ-30K's {{id: {{prompt, category}}}} JSON object")
  data = PromptData()
  for pid, entry in doc.items():
    if not isinstance(entry, dict):
      data.skip("bad_record", f"{pid}: not an object")
      continue
    category = entry.get("category")
    if _safe(pid, "id", data) and _safe(category, f"{pid}: category", data):
      data.add(pid, entry.get("prompt"), {"category": category}, str(pid))
  return data


def read_geneval(path: Path) -> PromptData:
  """GenEval's `evaluation_metadata.jsonl`: one JSON object per line ("tag", "include",
  "prompt", ...); prompt N keeps its line number N (the folder `<N:05d>`), so the folders match
  the official generation script's even when a bad line is skipped."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found")
  data = PromptData()
  lines = [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
  for n, line in enumerate(lines):
    try:
      entry = json.loads(line)
    except json.JSONDecodeError:
      data.skip("bad_record", f"{path}:{n + 1}: not JSON")
      continue
    if not isinstance(entry, dict) or not isinstance(entry.get("tag"), str):
      data.skip("bad_record", f"{path}:{n + 1}: needs an object with 'prompt' and 'tag'")
      continue
    data.add(f"{n:05d}", entry.get("prompt"), {"metadata": entry, "tag": entry["tag"]},
             f"{path}:{n + 1}")
  return data


def read_genai_bench(path: Path) -> PromptData:
  """GenAI-Bench's prompt JSON (t2v_metrics' `genai_image.json`): {"00000": {"prompt",
  "basic_skills", "advanced_skills", ...}}, or a list of {"id", "prompt"}; ids are
  prompt indices (written as `<id:05d>.jpeg`)."""
  path = Path(path)
  doc = tasks_lib._read_json(path)  # pylint: disable=protected-access
  if isinstance(doc, dict):
    entries = [(k, v) for k, v in doc.items()]
  elif isinstance(doc, list):
    entries = [(e.get("id") if isinstance(e, dict) else None, e) for e in doc]
  else:
    raise ValueError(f"{path}: expected GenAI-Bench's {{id: {{prompt}}}} object or a list")
  data = PromptData()
  for key, entry in entries:
    try:
      index = int(key)
    except (TypeError, ValueError):
      data.skip("bad_record", f"{key!r}: the id is not a prompt index")
      continue
    if index < 0 or not isinstance(entry, dict):
      data.skip("bad_record", f"{key!r}: needs a non-negative index and an object")
      continue
    skills = {k: entry[k] for k in ("basic_skills", "advanced_skills") if k in entry}
    data.add(f"{index:05d}", entry.get("prompt"), skills, str(key))
  return data


def read_dpg_bench(folder: Path) -> PromptData:
  """DPG-Bench's `prompts/` folder: `<item_id>.txt`, one prompt each (the item id keys the
  scorer's `dpg_bench.csv`); sorted by name."""
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"DPG-Bench prompt folder {folder} not found")
  files = sorted(folder.glob("*.txt"))
  if not files:
    raise FileNotFoundError(f"{folder} holds no <name>.txt prompt files")
  data = PromptData()
  for file in files:
    try:
      text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
      data.skip("bad_record", f"{file}: {e}")
      continue
    if _safe(file.stem, str(file), data):
      data.add(file.stem, text, {}, str(file))
  return data


# ---------------------------------------------------------------- writing
def write_atomic(path: Path, data: bytes) -> None:
  """`data` to `path` through a hidden temporary name in the same folder (rename is atomic)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with tmp.open("wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def encode(image: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buf.getvalue()


def grid(images: Sequence[np.ndarray]) -> np.ndarray:
  """Up to 4 (H, W, 3) images as DPG-Bench's 2x2 grid (row-major: the scorer's crops
  (0,0), (W,0), (0,H), (W,H)); missing cells are black."""
  h, w, c = images[0].shape
  out = np.zeros((2 * h, 2 * w, c), images[0].dtype)
  for k, image in enumerate(images[:4]):
    out[(k // 2) * h:(k // 2 + 1) * h, (k % 2) * w:(k % 2 + 1) * w] = image
  return out


def split_grid(image: np.ndarray, count: int) -> list[np.ndarray]:
  """The first `count` cells of a 2x2 grid written by `grid`."""
  h, w = image.shape[0] // 2, image.shape[1] // 2
  return [image[(k // 2) * h:(k // 2 + 1) * h, (k % 2) * w:(k % 2 + 1) * w] for k in range(count)]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a task's images go. `files(prompt, samples)`: every file a finished prompt has;
  `write(root, prompt, images)`: writes them (images: uint8 (H, W, 3), one per sample);
  `read(root, prompt, samples)`: the sample images back, as the scorer sees them."""
  files: Callable[[Prompt, int], list[str]]
  write: Callable[[Path, Prompt, list[np.ndarray]], None]
  read: Callable[[Path, Prompt, int], list[np.ndarray]]


def _open(path: Path) -> np.ndarray:
  with Image.open(path) as img:
    return np.asarray(img.convert("RGB"))


def _geneval_files(p: Prompt, samples: int) -> list[str]:
  return [f"{p.pid}/samples/{k:04d}.png" for k in range(samples)] + [f"{p.pid}/metadata.jsonl"]


def _geneval_write(root: Path, p: Prompt, images) -> None:
  for k, image in enumerate(images):
    write_atomic(root / p.pid / "samples" / f"{k:04d}.png", encode(image, "PNG"))
  # The scorer reads this with json.load: the prompt's own line, exactly one object.
  write_atomic(root / p.pid / "metadata.jsonl", (json.dumps(p.meta["metadata"]) + "\n").encode())


def _single(name: Callable[[Prompt], str], fmt: str) -> Layout:
  def write(root, p, images):
    write_atomic(root / name(p), encode(images[0], fmt))
  return Layout(files=lambda p, samples: [name(p)], write=write,
                read=lambda root, p, samples: [_open(root / name(p))])


LAYOUTS = {
    "mjhq": _single(lambda p: f"{p.meta['category']}/{p.pid}.png", "PNG"),
    "geneval": Layout(files=_geneval_files, write=_geneval_write,
                      read=lambda root, p, samples: [_open(root / f) for f in
                                                     _geneval_files(p, samples)[:-1]]),
    "genai_bench": _single(lambda p: f"{p.pid}.jpeg", "JPEG"),
    "dpg_bench": Layout(files=lambda p, samples: [f"{p.pid}.png"],
                        write=lambda root, p, images: write_atomic(root / f"{p.pid}.png",
                                                                   encode(grid(images), "PNG")),
                        read=lambda root, p, samples: split_grid(_open(root / f"{p.pid}.png"),
                                                                 samples)),
}


def complete(root: Path, layout: Layout, prompt: Prompt, samples: int) -> bool:
  """Whether every file of `prompt` exists (a finished prompt: a resumed run skips it)."""
  return all((root / f).is_file() for f in layout.files(prompt, samples))


@dataclasses.dataclass(frozen=True)
class GenerationTask:
  """A generation benchmark: its reader, its layout, the samples per prompt it expects (the
  ones `fixed_samples` is set for take no other), and the official scorer's command."""
  name: str
  read: Callable[[Path], PromptData]
  default_samples: int
  fixed_samples: bool
  scorer: str

  @property
  def layout(self) -> Layout:
    return LAYOUTS[self.name]


TASKS = {
    "mjhq": GenerationTask("mjhq", read_mjhq, 1, True,
                           "FID per category and overall, computed here (--inception_weights)"),
    "geneval": GenerationTask(
        "geneval", read_geneval, 4, False,
        "python evaluation/evaluate_images.py IMAGES --outfile results.jsonl --model-path "
        "OBJECT_DETECTOR_FOLDER && python evaluation/summary_scores.py results.jsonl"),
    "genai_bench": GenerationTask(
        "genai_bench", read_genai_bench, 1, True,
        "python genai_bench/evaluate.py --model clip-flant5-xxl --output_dir WORKDIR "
        "--gen_model images"),
    "dpg_bench": GenerationTask(
        "dpg_bench", read_dpg_bench, 4, False,
        "accelerate launch dpg_bench/compute_dpg_bench.py --image-root-path IMAGES "
        "--resolution SIZE --pic-num SAMPLES --vqa-model mplug"),
}


def get(name: str) -> GenerationTask:
  if name not in TASKS:
    raise ValueError(f"unknown generation task {name!r}; expected one of {sorted(TASKS)}")
  return TASKS[name]


def check_samples(task: GenerationTask, samples: int | None) -> int:
  """The samples per prompt to generate (None: the task's default), checked."""
  samples = task.default_samples if samples is None else int(samples)
  if samples < 1:
    raise ValueError(f"samples_per_prompt must be >= 1, got {samples}")
  if task.fixed_samples and samples != task.default_samples:
    raise ValueError(f"{task.name}'s scorer reads {task.default_samples} image per prompt; "
                     f"samples_per_prompt={samples} is not possible")
  if task.name == "dpg_bench" and samples > 4:
    raise ValueError(f"DPG-Bench's grid holds at most 4 samples, got {samples}")
  return samples
