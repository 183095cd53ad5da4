"""Scoring of the MLLM understanding benchmarks, rule for rule as their official tools score.

Pure Python (no JAX): predictions are strings, scores are plain floats, so other code and
checks can score any model's outputs.

* `pope` — LLaVA's `llava/eval/eval_pope.py`: only the first sentence (text before the first
  "."), commas dropped, split on spaces; "No", "no" or "not" as a word means no, anything else
  (including "Not sure" and the empty answer) yes. Fractions in [0, 1], as that script prints.
* `mme` — MME's `eval_tool/calculation.py`: prediction and label lower-cased; a prediction that
  is exactly "yes"/"no" is that, else "yes" in its first 4 characters means yes, else "no" there
  means no, else "other" (always wrong). Per subtask acc (per question) and acc+ (an image counts
  when all its questions are right), both in percent, score = acc + acc+; perception and
  cognition are the sums of their subtasks' scores.
* `vqa_accuracy` — the VQA evaluation (`vqaEval.py`, used for VQAv2 and TextVQA): the prediction
  is normalised (punctuation, number words to digits, articles dropped, contractions restored)
  as LLaVA and lmms-eval do before the official tool; the tool itself normalises the human
  answers (and the prediction again) only when they disagree; accuracy = mean over the
  leave-one-out subsets (ten for ten answers) of min(#matches / 3, 1).
* `gqa` — LLaVA's GQA conversion: prediction stripped of trailing "." and lower-cased, then exact
  match with the answer (the official GQA `eval.py` compares strings).
* `mmbench_circular` / `seed` — multiple choice without a GPT judge: an answer names an option by
  its letter ("B", "B.", "(B)", "B) a dog": exactly one option letter among its words) or else by
  its option text (exactly one option's text contained in it); neither is "unmatched" (counted
  wrong and reported). MMBench counts a question right only if every option rotation of it is.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Iterable, Mapping, Sequence

LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H", "I")

# ---------------------------------------------------------------- POPE


def pope_yes(text: str) -> bool:
  """LLaVA's POPE parsing of one answer: True for yes."""
  if "." in text:
    text = text.split(".")[0]
  words = text.replace(",", "").split(" ")
  return not any(w in ("No", "not", "no") for w in words)


def _label_yes(label: str) -> bool:
  label = str(label).strip().lower()
  if label not in ("yes", "no"):
    raise ValueError(f"a POPE label must be 'yes' or 'no', got {label!r}")
  return label == "yes"


def pope(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """accuracy, precision, recall, f1, yes_ratio (fractions) of yes/no answers; a ratio with a
  zero denominator (e.g. precision with no yes answers) is 0."""
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
  if not labels:
    raise ValueError("no POPE answers to score")
  pred = [pope_yes(p) for p in predictions]
  gold = [_label_yes(l) for l in labels]
  tp = sum(p and g for p, g in zip(pred, gold))
  tn = sum(not p and not g for p, g in zip(pred, gold))
  fp = sum(p and not g for p, g in zip(pred, gold))
  fn = sum(not p and g for p, g in zip(pred, gold))
  div = lambda a, b: a / b if b else 0.0
  precision, recall = div(tp, tp + fp), div(tp, tp + fn)
  return {"accuracy": div(tp + tn, len(gold)), "precision": precision, "recall": recall,
          "f1": div(2 * precision * recall, precision + recall),
          "yes_ratio": div(sum(pred), len(pred)), "count": len(gold),
          "tp": tp, "fp": fp, "tn": tn, "fn": fn}


# ---------------------------------------------------------------- MME
MME_SUBTASKS = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                   "landmark", "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation",
                  "code_reasoning"),
}


def mme_label(prediction: str) -> str:
  """The official MME parsing of a (lower-cased) answer: "yes", "no" or "other"."""
  text = prediction.lower()
  if text in ("yes", "no"):
    return text
  head = text[:4]
  return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """Records with `subtask`, `image`, `prediction`, `answer` ("Yes"/"No"). Returns
  {"subtasks": {name: {acc, acc_plus, score, questions, images, other}}, "perception",
  "cognition" (sums of the present subtasks' scores), "missing_subtasks"}."""
  by_task: dict[str, dict[str, list[bool]]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  other: collections.Counter = collections.Counter()
  for r in records:
    gold = str(r["answer"]).lower().strip()
    if gold not in ("yes", "no"):
      raise ValueError(f"an MME answer must be Yes or No, got {r['answer']!r}")
    label = mme_label(str(r["prediction"]))
    other[r["subtask"]] += label == "other"
    by_task[r["subtask"]][str(r["image"])].append(label == gold)
  if not by_task:
    raise ValueError("no MME answers to score")
  subtasks = {}
  for name, images in sorted(by_task.items()):
    answers = [ok for oks in images.values() for ok in oks]
    acc = 100.0 * sum(answers) / len(answers)
    acc_plus = 100.0 * sum(all(oks) for oks in images.values()) / len(images)
    subtasks[name] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                      "questions": len(answers), "images": len(images), "other": other[name]}
  out: dict[str, Any] = {"subtasks": subtasks}
  known = {n for names in MME_SUBTASKS.values() for n in names}
  for group, names in MME_SUBTASKS.items():
    out[group] = sum(subtasks[n]["score"] for n in names if n in subtasks)
  out["missing_subtasks"] = [n for names in MME_SUBTASKS.values() for n in names
                             if n not in subtasks]
  out["unknown_subtasks"] = sorted(set(subtasks) - known)
  return out


# ---------------------------------------------------------------- VQA accuracy
# The VQA evaluation's tables: contractions written without apostrophes -> the proper form.
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've""".split())
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!")
# The tool's patterns, quirks included: "(?!<=\d)" is a lookahead (not a lookbehind), and the
# tool passes re.UNICODE (= 32) as the `count` of the substitution, so at most 32 periods go.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def vqa_punctuation(text: str) -> str:
  """The VQA tool's punctuation step: a mark next to a space (or any mark in a text with a
  digit,digit comma) is removed, otherwise replaced by a space; periods not before a digit go."""
  out = text
  for p in _PUNCT:
    if p + " " in text or " " + p in text or _DIGIT_COMMA.search(text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out, count=int(re.UNICODE))


def vqa_digits_articles(text: str) -> str:
  """Lower-case words, number words as digits, articles dropped, contractions restored."""
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _ARTICLES]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(text: str) -> str:
  """A prediction as the VQA tool compares it."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return vqa_digits_articles(vqa_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """The VQA accuracy of one prediction against the human answers (10 in VQAv2 / TextVQA):
  mean over leave-one-out subsets of min(#subset answers equal to the prediction / 3, 1)."""
  if not answers:
    raise ValueError("a VQA question needs at least one human answer")
  pred = vqa_normalize(prediction)
  gold = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
  if len(set(gold)) > 1:
    gold = [vqa_digits_articles(vqa_punctuation(a)) for a in gold]
    pred = vqa_normalize(pred)
  scores = []
  for i in range(len(gold)):
    matches = sum(a == pred for j, a in enumerate(gold) if j != i)
    scores.append(min(1.0, matches / 3))
  return sum(scores) / len(scores)


def vqa(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """Records with `prediction` and `answers` (and optional `answer_type`): accuracy in percent,
  overall and per answer type."""
  return _grouped_accuracy(((r.get("answer_type"), 100.0 * vqa_accuracy(str(r["prediction"]),
                                                                         list(r["answers"])))
                            for r in records), "answer_types")


def gqa_match(prediction: str, answer: str) -> bool:
  """GQA exact match after LLaVA's conversion (trailing periods stripped, lower case)."""
  return prediction.strip().rstrip(".").lower() == str(answer).strip().lower()


def gqa(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """Records with `prediction`, `answer` (and optional `question_type`): exact-match accuracy
  in percent, overall and per question type."""
  return _grouped_accuracy(((r.get("question_type"), 100.0 * gqa_match(str(r["prediction"]),
                                                                       r["answer"]))
                            for r in records), "question_types")


def _grouped_accuracy(pairs, group_name: str) -> dict[str, Any]:
  groups: dict[Any, list[float]] = collections.defaultdict(list)
  everything = []
  for group, score in pairs:
    everything.append(score)
    if group is not None:
      groups[str(group)].append(score)
  if not everything:
    raise ValueError("no answers to score")
  out: dict[str, Any] = {"accuracy": sum(everything) / len(everything), "count": len(everything)}
  if groups:
    out[group_name] = {g: sum(s) / len(s) for g, s in sorted(groups.items())}
  return out


# ---------------------------------------------------------------- multiple choice
def options_of(record: Mapping[str, Any]) -> dict[str, str]:
  """{letter: option text} of the options a record has (missing / empty / NaN ones dropped)."""
  out = {}
  for letter in LETTERS:
    value = record.get(letter)
    if value is None or (isinstance(value, float) and value != value):
      continue
    text = str(value).strip()
    if text and text.lower() != "nan":
      out[letter] = text
  return out


_CHOICE_MARKS = re.compile(r"[.()\[\],:;!*#{}]")


def match_option(prediction: str, options: Mapping[str, str]) -> str | None:
  """The letter an answer names, or None when it names no single option: exactly one option
  letter among its words (after ".()[],:;!*#{}" become spaces), else exactly one option whose
  text (case-insensitive) it contains."""
  words = _CHOICE_MARKS.sub(" ", prediction).split()
  letters = [l for l in options if l in words]
  if len(letters) == 1:
    return letters[0]
  if letters:
    return None
  low = prediction.lower()
  texts = [l for l, t in options.items() if t.lower() in low]
  if len(texts) == 1:
    return texts[0]
  if len(texts) > 1:  # an option text inside another ("dog" and "a dog"): the longest one
    longest = max(texts, key=lambda l: len(options[l]))
    if all(options[l].lower() in options[longest].lower() for l in texts):
      return longest
  return None


def mmbench_circular(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """Records with `index` (the question: all its option rotations share it), `prediction`,
  `answer` (the right letter of this rotation) and the option texts `A`…`D` (optional
  `category`). Returns accuracy (circular, percent: a question is right only if every rotation
  is), vanilla_accuracy (every rotation counted alone), unmatched_rate, questions, and
  per-category circular accuracy."""
  right: dict[Any, list[bool]] = collections.defaultdict(list)
  category: dict[Any, str] = {}
  unmatched = total = 0
  for r in records:
    letter = match_option(str(r["prediction"]), options_of(r))
    unmatched += letter is None
    total += 1
    right[r["index"]].append(letter == str(r["answer"]).strip())
    if r.get("category") is not None:
      category[r["index"]] = str(r["category"])
  if not right:
    raise ValueError("no MMBench answers to score")
  circular = {q: all(oks) for q, oks in right.items()}
  out: dict[str, Any] = {
      "accuracy": 100.0 * sum(circular.values()) / len(circular),
      "vanilla_accuracy": 100.0 * sum(sum(o) for o in right.values()) / total,
      "unmatched_rate": 100.0 * unmatched / total, "questions": len(circular), "answers": total}
  if category:
    per: dict[str, list[bool]] = collections.defaultdict(list)
    for q, ok in circular.items():
      per[category.get(q, "")].append(ok)
    out["categories"] = {c: 100.0 * sum(v) / len(v) for c, v in sorted(per.items())}
  return out


def seed(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """Records with `prediction` (an answer, or a letter from log-likelihood ranking),
  `answer` (letter), options `A`…`D` and `question_type`: accuracy in percent overall and per
  question type, and the unmatched rate."""
  records = list(records)
  letters = [match_option(str(r["prediction"]), options_of(r)) for r in records]
  out = _grouped_accuracy(((r.get("question_type"), 100.0 * (l == str(r["answer"]).strip()))
                           for r, l in zip(records, letters)), "question_types")
  out["unmatched_rate"] = 100.0 * sum(l is None for l in letters) / len(records)
  return out
