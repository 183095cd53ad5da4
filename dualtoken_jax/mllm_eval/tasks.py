"""The understanding benchmarks: each task's files read in their real layout, its prompts, and
how its predictions are scored (`scoring`).

A task reads `--data PATH` into `Item`s (question id, prompt, image, what scoring needs) and
skips, with a counted reason (`SKIPS`, the data pipeline's `records.SkipReasons`), records it
cannot use: a missing field ("bad_record") or a missing image file ("missing"); an image that
does not decode is skipped and counted by the runner when it is loaded. Layouts:

| task | `--data` | images |
|---|---|---|
| `pope` | folder with LLaVA's `llava_pope_test.jsonl` and/or `coco_pope_{adversarial,popular,random}.json` (also under `coco/`) | `--images` (COCO val2014), default `DATA/val2014` |
| `mme` | `MME_Benchmark_release_version/`: per subtask images + `*.txt` ("question\\tYes"), or `images/` + `questions_answers_YN/` | inside |
| `mmbench` | the dev TSV (`index, question, hint, A..D, answer, category, image` base64) | inside |
| `seed` | `SEED-Bench.json` (image questions) | `--images`, default `DATA/../SEED-Bench-image` |
| `gqa` | `testdev_balanced_questions.json` | `--images`, default `DATA/../images` |
| `vqav2` | `v2_OpenEnded_mscoco_val2014_questions.json` (annotations beside it: `…_annotations.json`) | `--images`, default `DATA/../val2014` |
| `textvqa` | `TextVQA_0.5.1_val.json` | `--images`, default `DATA/../train_images` |

Prompts follow LLaVA's evaluation (`style="llava"`): a short-answer question gets
"\\nAnswer the question using a single word or phrase.", a multiple-choice one its options as
"A. …" lines and "\\nAnswer with the option's letter from the given choices directly.";
`style="plain"` is the bare question (options still listed), for models trained without them.
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from dualtoken_jax.data import records
from dualtoken_jax.mllm_eval import scoring

SKIPS = records.IMAGE_SKIPS.extend("bad_record")
SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
STYLES = ("llava", "plain")
POPE_SPLITS = ("adversarial", "popular", "random")


@dataclasses.dataclass
class Item:
  """One question: `qid` (unique in the task), the prompt, the image (a path, bytes or None),
  `meta` (JSON data the scorer reads, stored with the prediction) and, for multiple choice,
  the option texts in letter order (ranked by log-likelihood in that mode)."""
  qid: str
  prompt: str
  image: Any
  meta: dict
  choices: tuple[str, ...] = ()
  question: str = ""  # the bare question: the prompt of log-likelihood ranking


class TaskData:
  """Items and the {reason: count} of records skipped while reading."""

  def __init__(self):
    self.items: list[Item] = []
    self.skipped = {name: 0 for name in SKIPS.names}
    self.examples: dict[str, str] = {}

  def skip(self, reason: str, what: str) -> None:
    SKIPS.index(reason)
    self.skipped[reason] += 1
    self.examples.setdefault(reason, what)


def strip_suffix(question: str) -> str:
  """A question without LLaVA's answer-format suffixes (the task adds them per style)."""
  q = question.strip()
  for suffix in (SHORT_ANSWER, MULTIPLE_CHOICE):
    if q.endswith(suffix):
      q = q[:-len(suffix)].rstrip()
  return q


def short_prompt(question: str, style: str) -> str:
  q = strip_suffix(question)
  return f"{q}\n{SHORT_ANSWER}" if style == "llava" else q


def choice_prompt(question: str, options: Mapping[str, str], style: str, hint: str = "") -> str:
  """LLaVA's multiple-choice prompt: [hint\\n]question, "A. …" lines, the letter instruction."""
  q = strip_suffix(question)
  if hint:
    q = f"{hint}\n{q}"
  q += "".join(f"\n{letter}. {text}" for letter, text in options.items())
  return f"{q}\n{MULTIPLE_CHOICE}" if style == "llava" else q


def _read_json(path: Path):
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def _read_jsonl(path: Path) -> list[dict]:
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found")
  out = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n} is not a JSON line: {e}") from e
  return out


def _image_path(data: TaskData, folder: Path, name: Any, qid: str) -> Path | None:
  path = folder / str(name)
  if not path.is_file():
    data.skip("missing", f"{qid}: image {path} not found")
    return None
  return path


# ---------------------------------------------------------------- POPE
def _pope_label_files(root: Path) -> dict[str, Path]:
  found = {}
  for split in POPE_SPLITS:
    for folder in (root, root / "coco"):
      if (folder / f"coco_pope_{split}.json").is_file():
        found[split] = folder / f"coco_pope_{split}.json"
        break
  return found


def read_pope(root: Path, images: Path | None, style: str) -> TaskData:
  """LLaVA's `llava_pope_test.jsonl` (question_id, image, text, category) with the labels of
  `coco_pope_<split>.json` (JSON lines: question_id, image, text, label), matched per split in
  file order as LLaVA's `eval_pope.py` does (and checked by question text); without the
  LLaVA file, the questions come from the label files themselves."""
  root = Path(root)
  label_files = _pope_label_files(root)
  if not label_files:
    raise FileNotFoundError(f"no coco_pope_{{{','.join(POPE_SPLITS)}}}.json in {root} or "
                            f"{root / 'coco'}")
  images = Path(images) if images else root / "val2014"
  data = TaskData()
  llava = root / "llava_pope_test.jsonl"
  questions = _read_jsonl(llava) if llava.is_file() else None
  for split, file in label_files.items():
    labels = _read_jsonl(file)
    if questions is None:
      rows = [(f"{split}/{l.get('question_id')}", l, l) for l in labels]
    else:
      asked = [q for q in questions if q.get("category") == split]
      if len(asked) != len(labels):
        raise ValueError(f"{llava} has {len(asked)} {split} questions but {file} has "
                         f"{len(labels)} labels")
      rows = [(str(q.get("question_id")), q, l) for q, l in zip(asked, labels)]
    for qid, q, label in rows:
      text, image, gold = q.get("text"), q.get("image"), str(label.get("label", "")).lower()
      if not isinstance(text, str) or image is None or gold not in ("yes", "no"):
        data.skip("bad_record", f"{split} {qid}: needs text, image and a yes/no label")
        continue
      if strip_suffix(text) != strip_suffix(str(label.get("text", text))):
        raise ValueError(f"POPE question {qid} ({split}) does not match its label's question "
                         f"in {file}: {text!r} vs {label.get('text')!r}")
      path = _image_path(data, images, image, qid)
      if path is not None:
        data.items.append(Item(qid, short_prompt(text, style), path,
                               {"split": split, "label": gold}))
  return data


def score_pope(rows: list[dict]) -> dict:
  out: dict[str, Any] = {}
  for split in POPE_SPLITS:
    part = [r for r in rows if r["split"] == split]
    if part:
      out[split] = scoring.pope([r["prediction"] for r in part], [r["label"] for r in part])
  if not out:
    raise ValueError("no POPE answers to score")
  splits = list(out)
  for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
    out[key] = sum(out[s][key] for s in splits) / len(splits)
  return out


# ---------------------------------------------------------------- MME
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def _mme_pairs(folder: Path):
  """(question file, image path or None) of one subtask folder, either layout."""
  if (folder / "questions_answers_YN").is_dir():
    txt_dir, img_dir = folder / "questions_answers_YN", folder / "images"
  else:
    txt_dir = img_dir = folder
  for txt in sorted(txt_dir.glob("*.txt")):
    image = next((img_dir / (txt.stem + s) for s in IMAGE_SUFFIXES + tuple(x.upper() for x in
                  IMAGE_SUFFIXES) if (img_dir / (txt.stem + s)).is_file()), None)
    yield txt, image


def read_mme(root: Path, images: Path | None, style: str) -> TaskData:
  """The MME release folder: one folder per subtask whose question files ("question\\tYes"
  per line, two per image) sit beside their images or in `questions_answers_YN/` beside
  `images/`. A `.jsonl` (lmms-eval / LLaVA style: question_id, image, text, category and an
  `answer`) is read too; the images are then under `--images` (default its folder)."""
  root = Path(root)
  data = TaskData()
  if root.is_file():
    base = Path(images) if images else root.parent
    for q in _read_jsonl(root):
      qid, gold = str(q.get("question_id")), str(q.get("answer", q.get("label", ""))).strip()
      if gold.lower() not in ("yes", "no") or not isinstance(q.get("text"), str) \
          or not q.get("category") or not q.get("image"):
        data.skip("bad_record", f"{qid}: needs text, image, category and a Yes/No answer "
                                "(LLaVA's llava_mme.jsonl has no answers: use the MME folder)")
        continue
      path = _image_path(data, base, q["image"], qid)
      if path is not None:
        data.items.append(Item(qid, short_prompt(q["text"], style), path,
                               {"subtask": q["category"], "image": q["image"], "answer": gold}))
    return data
  if not root.is_dir():
    raise FileNotFoundError(f"MME folder {root} not found")
  known = {n for names in scoring.MME_SUBTASKS.values() for n in names}
  subtasks = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in known]
  if not subtasks:
    raise FileNotFoundError(f"{root} holds none of MME's subtask folders ({sorted(known)})")
  for folder in subtasks:
    for txt, image in _mme_pairs(folder):
      name = f"{folder.name}/{txt.stem}"
      if image is None:
        data.skip("missing", f"{name}: no image beside {txt}")
        continue
      lines = [l for l in txt.read_text(errors="replace").splitlines() if l.strip()]
      for k, line in enumerate(lines):
        question, _, gold = line.rpartition("\t")
        if not question or gold.strip().lower() not in ("yes", "no"):
          data.skip("bad_record", f"{txt}:{k + 1}: expected 'question<TAB>Yes|No'")
          continue
        data.items.append(Item(f"{name}/{k}", short_prompt(question, style), image,
                               {"subtask": folder.name, "image": name,
                                "answer": gold.strip()}))
  return data


# ---------------------------------------------------------------- MMBench
def read_mmbench(tsv: Path, images: Path | None, style: str) -> TaskData:
  """The MMBench TSV. A file with circular copies (index + k * 1e6, the official dev TSV)
  is used as is, grouped by index mod 1e6; otherwise each question is asked once per
  rotation of its options (LLaVA's `--all-rounds`)."""
  tsv = Path(tsv)
  if not tsv.is_file():
    raise FileNotFoundError(f"MMBench TSV {tsv} not found")
  csv.field_size_limit(sys.maxsize)
  with tsv.open(newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  data = TaskData()
  indices = []
  for row in rows:
    try:
      indices.append(int(row.get("index", "")))
    except ValueError:
      indices.append(None)
  circular_copies = any(i is not None and i >= 1_000_000 for i in indices)
  for row, index in zip(rows, indices):
    options = scoring.options_of(row)
    answer = (row.get("answer") or "").strip()
    if index is None or not row.get("question") or len(options) < 2 or answer not in options:
      data.skip("bad_record", f"row {row.get('index')!r}: needs index, question, >= 2 options "
                              "and an answer among them")
      continue
    try:
      image = base64.b64decode(row.get("image") or "", validate=True)
    except (binascii.Error, ValueError):
      image = b""
    if not image:
      data.skip("empty", f"row {index}: no base64 image")
      continue
    hint = (row.get("hint") or "").strip()
    hint = "" if hint.lower() == "nan" else hint
    letters = list(options)
    texts = [options[l] for l in letters]
    rounds = 1 if circular_copies else len(letters)
    for r in range(rounds):
      rotated = dict(zip(letters, texts[r:] + texts[:r]))
      right = letters[(letters.index(answer) - r) % len(letters)]
      meta = {"index": index % 1_000_000, "answer": right, "category": row.get("category"),
              **rotated}
      data.items.append(Item(f"{index}/{r}", choice_prompt(row["question"], rotated, style,
                                                           hint), image, meta,
                             tuple(rotated.values()),
                             f"{hint}\n{row['question']}" if hint else row["question"]))
  return data


# ---------------------------------------------------------------- SEED-Bench
def read_seed(path: Path, images: Path | None, style: str) -> TaskData:
  """SEED-Bench's JSON (`questions`: question_id, question, choice_a..d, answer, data_id,
  data_type, question_type_id; `question_type`: name -> id); the image questions only."""
  path = Path(path)
  doc = _read_json(path)
  if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
    raise ValueError(f"{path}: expected SEED-Bench's JSON with a 'questions' list")
  names = {v: k for k, v in (doc.get("question_type") or {}).items()}
  folder = Path(images) if images else path.parent / "SEED-Bench-image"
  data = TaskData()
  for q in doc["questions"]:
    if q.get("data_type", "image") != "image":
      continue
    qid = str(q.get("question_id"))
    options = {l: q.get(f"choice_{l.lower()}") for l in "ABCD"}
    if not isinstance(q.get("question"), str) or not all(isinstance(v, str) for v in
                                                         options.values()) \
        or q.get("answer") not in options or not q.get("data_id"):
      data.skip("bad_record", f"{qid}: needs question, choice_a..d, answer A-D and data_id")
      continue
    name = str(q["data_id"])
    if not (folder / name).is_file() and (folder / (name + ".jpg")).is_file():
      name += ".jpg"
    image = _image_path(data, folder, name, qid)
    if image is None:
      continue
    qtype = q.get("question_type_id")
    data.items.append(Item(qid, choice_prompt(q["question"], options, style), image,
                           {"answer": q["answer"],
                            "question_type": names.get(qtype, str(qtype)), **options},
                           tuple(options.values()), q["question"]))
  return data


# ---------------------------------------------------------------- GQA / VQAv2 / TextVQA
def read_gqa(path: Path, images: Path | None, style: str) -> TaskData:
  """GQA's `{qid: {imageId, question, answer, types: {structural, ...}}}` questions file."""
  path = Path(path)
  doc = _read_json(path)
  if not isinstance(doc, dict):
    raise ValueError(f"{path}: expected GQA's {{question id: question}} JSON object")
  folder = Path(images) if images else path.parent / "images"
  data = TaskData()
  for qid, q in doc.items():
    if not isinstance(q, dict) or not isinstance(q.get("question"), str) \
        or "answer" not in q or "imageId" not in q:
      data.skip("bad_record", f"{qid}: needs question, answer and imageId")
      continue
    image = _image_path(data, folder, f"{q['imageId']}.jpg", qid)
    if image is not None:
      data.items.append(Item(str(qid), short_prompt(q["question"], style), image,
                             {"answer": str(q["answer"]),
                              "question_type": (q.get("types") or {}).get("structural")}))
  return data


def _answers(entry) -> list[str] | None:
  answers = entry.get("answers")
  if not isinstance(answers, list) or not answers:
    return None
  return [a["answer"] if isinstance(a, dict) else a for a in answers]


def read_vqav2(path: Path, images: Path | None, style: str) -> TaskData:
  """VQAv2 questions (`questions`: question_id, image_id, question; `data_subtype` names the
  COCO folder) with the annotations file beside it (`…_questions.json` ->
  `…_annotations.json`); images `COCO_<subtype>_<image_id:012d>.jpg`."""
  path = Path(path)
  doc = _read_json(path)
  notes_path = path.with_name(path.name.replace("OpenEnded_", "").replace("_questions",
                                                                          "_annotations"))
  notes = {a.get("question_id"): a for a in _read_json(notes_path).get("annotations", [])}
  subtype = doc.get("data_subtype", "val2014")
  folder = Path(images) if images else path.parent / subtype
  data = TaskData()
  for q in doc.get("questions", []):
    qid, note = q.get("question_id"), notes.get(q.get("question_id"))
    answers = None if note is None else _answers(note)
    if not isinstance(q.get("question"), str) or answers is None or "image_id" not in q:
      data.skip("bad_record", f"{qid}: needs question, image_id and annotated answers")
      continue
    image = _image_path(data, folder, f"COCO_{subtype}_{int(q['image_id']):012d}.jpg", str(qid))
    if image is not None:
      data.items.append(Item(str(qid), short_prompt(q["question"], style), image,
                             {"answers": answers, "answer_type": note.get("answer_type")}))
  return data


def read_textvqa(path: Path, images: Path | None, style: str) -> TaskData:
  """TextVQA's `{"data": [{question_id, question, image_id, answers}]}`; images
  `<image_id>.jpg` (default folder `train_images/` beside the JSON)."""
  path = Path(path)
  doc = _read_json(path)
  folder = Path(images) if images else path.parent / "train_images"
  data = TaskData()
  for q in doc.get("data", []) if isinstance(doc, dict) else []:
    qid, answers = q.get("question_id"), _answers(q)
    if not isinstance(q.get("question"), str) or answers is None or "image_id" not in q:
      data.skip("bad_record", f"{qid}: needs question, image_id and answers")
      continue
    image = _image_path(data, folder, f"{q['image_id']}.jpg", str(qid))
    if image is not None:
      data.items.append(Item(str(qid), short_prompt(q["question"], style), image,
                             {"answers": answers}))
  return data


@dataclasses.dataclass(frozen=True)
class Task:
  """A benchmark: its reader, its scorer (rows = meta + "prediction") and the metric names
  its summary shows (the first is the one papers headline)."""
  name: str
  read: Callable[[Path, Path | None, str], TaskData]
  score: Callable[[list[dict]], dict]
  headline: tuple[str, ...]
  multiple_choice: bool = False
  max_new_tokens: int = 16


TASKS = {
    "pope": Task("pope", read_pope, score_pope, ("f1", "accuracy", "precision", "recall",
                                                 "yes_ratio")),
    "mme": Task("mme", read_mme, scoring.mme, ("perception", "cognition")),
    "mmbench": Task("mmbench", read_mmbench, scoring.mmbench_circular,
                    ("accuracy", "vanilla_accuracy", "unmatched_rate"), multiple_choice=True),
    "seed": Task("seed", read_seed, scoring.seed, ("accuracy", "unmatched_rate"),
                 multiple_choice=True),
    "gqa": Task("gqa", read_gqa, scoring.gqa, ("accuracy",)),
    "vqav2": Task("vqav2", read_vqav2, scoring.vqa, ("accuracy",)),
    "textvqa": Task("textvqa", read_textvqa, scoring.vqa, ("accuracy",)),
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
  return TASKS[name]
