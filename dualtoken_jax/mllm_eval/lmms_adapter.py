"""lmms-eval's requests answered by a `UnifiedModel`: the logic of the `dualtoken_jax` lmms-eval
model plugin (`lmms_plugin.py`), kept free of lmms-eval so that it is tested without it.

    adapter = LmmsAdapter(UnifiedModel.from_checkpoint("workdirs/mllm"), batch_size=8)
    texts = adapter.generate_until([instance.args for instance in requests], task_dict)
    scores = adapter.loglikelihood([instance.args for instance in requests], task_dict)

Requests are lmms-eval's `Instance.args` tuples and `task_dict` is the plugin's
`lmms.task_dict` ({task: {split: docs}}, docs indexed by `doc_id`):

* `generate_until`: (context, gen_kwargs, doc_to_visual, doc_id, task, split). The image is
  `doc_to_visual(doc)` (a list of PIL images, image paths or arrays; empty or None: text
  only), converted with the project's decoder and eval geometry (`data.decode` rules, shorter
  side to the tokenizer's size, centre crop: what `load_image` does to a file). The DualToken
  MLLM takes one image per prompt; a request with more, or with a video or audio clip, is an
  error naming the task and document. gen_kwargs as lmms-eval's models read them: `until` (a
  string or a list; each non-empty one cuts the answer before its first occurrence, after
  generation, as lmms-eval's LLaVA / Qwen2.5-VL plugins do; generation itself stops at the
  model's EOS), `max_new_tokens` (default: the adapter's), `temperature` (0 or `do_sample`
  false: greedy), `top_p`, `top_k`; `num_beams` > 1 is refused (no beam search). Greedy
  requests with equal `max_new_tokens` run together through `UnifiedModel.answer_batch` in
  fixed-size batches (one compilation per prompt-length bucket); sampled ones one by one
  through `UnifiedModel.answer` (seeded by the adapter's seed and the request's position).
  lmms-eval's `<image>` placeholder is removed from the context (the prompt layout puts the
  image itself, as in training).
* `loglikelihood`: (context, continuation or doc_to_target, doc_to_visual, doc_id, task,
  split), or (context, continuation) with no image. Scored by
  `UnifiedModel.loglikelihood_batch`: (summed log-probability of the continuation, whether it
  is the greedy continuation). The continuation is the model turn's text, which starts at a
  token boundary: the leading whitespace lmms-eval adds (a multiple-choice task's
  `target_delimiter`, meant for plain-text concatenation) is dropped. lmms-eval's own
  multiple-choice scoring ranks by `argmin` (its models return a loss), so the plugin hands it
  the negated value (`lmms_score`, "nll"; "logprob" keeps the sign).

An image that cannot be decoded is skipped and counted (`skipped`, by `data.records` reason,
with the first `examples`): its request answers "" (`generate_until`) or (-inf, False)
(`loglikelihood`), so the rest of the run goes on, and the plugin reports the counts.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from dualtoken_jax.data import decode
from dualtoken_jax.data.transforms import load_image, resize_center_crop, to_float

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_MAX_NEW_TOKENS = 128
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
MAX_EXAMPLES = 5
SCORES = ("nll", "logprob")


def stop_at(text: str, until: Sequence[str]) -> str:
  """`text` cut before the first occurrence of each non-empty stop string, in order (lmms-eval's
  `for term in until: text = text.split(term)[0]`)."""
  for term in until:
    if term:
      text = text.split(term)[0]
  return text


def generation_options(gen_kwargs: dict | None, default_max_new_tokens: int) -> dict:
  """The decoding options of one request's gen_kwargs: {until (tuple), max_new_tokens,
  temperature, top_p, top_k, greedy}. ValueError for what the model cannot do."""
  gen_kwargs = dict(gen_kwargs or {})
  until = gen_kwargs.get("until", ())
  if isinstance(until, str):
    until = (until,)
  elif isinstance(until, (list, tuple)) and all(isinstance(t, str) for t in until):
    until = tuple(until)
  else:
    raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
  max_new_tokens = int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens)
  if max_new_tokens < 1:
    raise ValueError(f"gen_kwargs['max_new_tokens'] must be >= 1, got {max_new_tokens}")
  num_beams = int(gen_kwargs.get("num_beams") or 1)
  if num_beams > 1:
    raise ValueError(f"gen_kwargs['num_beams']={num_beams}: the DualToken MLLM decodes greedily"
                     " or by sampling, without beam search; use num_beams 1")
  temperature = float(gen_kwargs.get("temperature") or 0.0)
  if temperature < 0:
    raise ValueError(f"gen_kwargs['temperature'] must be >= 0, got {temperature}")
  do_sample = gen_kwargs.get("do_sample")
  greedy = temperature == 0 or do_sample is False
  top_p = gen_kwargs.get("top_p")
  top_k = gen_kwargs.get("top_k")
  return {"until": until, "max_new_tokens": max_new_tokens, "greedy": greedy,
          "temperature": 0.0 if greedy else temperature,
          "top_p": None if top_p is None else float(top_p),
          "top_k": None if not top_k else int(top_k)}


def lmms_score(pair: tuple[float, bool], score: str) -> tuple[float, bool]:
  """A (log-likelihood, is_greedy) pair in the convention lmms-eval's scoring reads. "nll": the
  negated sum (lower is better): lmms-eval's multiple-choice scoring picks `argmin` ("since we
  return the actual loss in many model loglikelihood", its LLaVA plugin returning the mean
  token loss), so the least surprising option wins, as lm-eval's `acc` picks it. "logprob": the
  pair as is, the `lmms.loglikelihood` docstring's convention (what its `perplexity`
  aggregation, exp(-mean), expects)."""
  if score not in SCORES:
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")
  logp, greedy = pair
  return (-logp if score == "nll" else logp), greedy


def model_image(visual, size: int) -> np.ndarray:
  """One lmms-eval visual (a PIL image, an image file path or bytes, or a decoded HW(C) array)
  as the model's input: float32 (size, size, 3) in [-1, 1], the eval geometry of `load_image`.

  Raises:
    decode.SkipImage: the image cannot be decoded or is too large.
    ValueError: a video file or another kind of input.
  """
  if isinstance(visual, (str, os.PathLike)):
    if str(visual).lower().endswith(VIDEO_SUFFIXES):
      raise ValueError(f"{visual} is a video; the DualToken MLLM reads single images")
    return load_image(visual, size)
  if isinstance(visual, bytes):
    return load_image(visual, size)
  if isinstance(visual, Image.Image):
    rgb = decode.pil_to_rgb(visual)
  elif isinstance(visual, np.ndarray):
    rgb = decode.array_to_rgb(visual)
  else:
    raise ValueError(f"cannot use a {type(visual).__name__} as an image (expected a PIL image, "
                     "an image file path or bytes, or an array)")
  return to_float(resize_center_crop(rgb, size))


def _where(task, split, doc_id) -> str:
  return f"task {task!r} split {split!r} doc {doc_id!r}"


class LmmsAdapter:
  """lmms-eval requests -> batched `UnifiedModel` calls -> lmms-eval results (module docstring).

  Args:
    model: a `UnifiedModel`.
    batch_size: rows per model call (padded to it: one compilation per length bucket).
    max_new_tokens: for requests whose gen_kwargs name none.
    length_bucket, mesh: as in `UnifiedModel.answer_batch`.
    seed: of sampled requests (request i of a call uses seed + i).
  """

  def __init__(self, model, *, batch_size: int = 8,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, length_bucket: int = 32,
               mesh=None, seed: int = 0):
    if int(batch_size) < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(max_new_tokens) < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    self.model = model
    self.batch_size = int(batch_size)
    self.max_new_tokens = int(max_new_tokens)
    self.length_bucket = int(length_bucket)
    self.mesh = mesh
    self.seed = int(seed)
    self.skipped: dict[str, int] = {}
    self.examples: list[str] = []

  # ------------------------------------------------------------------ requests -> inputs
  def _image(self, doc_to_visual: Callable | None, task_dict, task, split, doc_id):
    """The request's one model image, or None (text only); SkipImage for an undecodable one."""
    if doc_to_visual is None:
      return None
    visuals = doc_to_visual(task_dict[task][split][doc_id])
    if visuals is None:
      return None
    if not isinstance(visuals, (list, tuple)):
      visuals = [visuals]
    visuals = [v for v in visuals if v is not None]
    if not visuals:
      return None
    if len(visuals) > 1:
      raise ValueError(f"{_where(task, split, doc_id)} has {len(visuals)} images; the DualToken "
                       "MLLM takes one image per prompt (choose single-image tasks)")
    try:
      return model_image(visuals[0], self.model.config.model.tokenizer.image_size)
    except ValueError as e:
      if isinstance(e, decode.SkipImage):
        raise
      raise ValueError(f"{_where(task, split, doc_id)}: {e}") from e

  def _skip(self, e: decode.SkipImage, task, split, doc_id) -> None:
    self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
    if len(self.examples) < MAX_EXAMPLES:
      self.examples.append(f"{_where(task, split, doc_id)}: {e}")

  @staticmethod
  def _context(context) -> str:
    if isinstance(context, list):  # some tasks pass [context]
      if len(context) != 1:
        raise ValueError(f"expected one context string, got {len(context)}")
      context = context[0]
    if not isinstance(context, str):
      raise ValueError(f"the context must be a string, got {type(context).__name__}")
    return context.replace(IMAGE_PLACEHOLDER, "").strip()

  # ------------------------------------------------------------------ generate_until
  def generate_until(self, requests: Sequence[tuple], task_dict) -> list[str]:
    """The answer text of each (context, gen_kwargs, doc_to_visual, doc_id, task, split)."""
    out: list[str | None] = [None] * len(requests)
    greedy: dict[int, list[tuple[int, str, Any, dict]]] = {}
    for i, args in enumerate(requests):
      if len(args) != 6:
        raise ValueError(f"a generate_until request has 6 arguments (context, gen_kwargs, "
                         f"doc_to_visual, doc_id, task, split), got {len(args)}")
      context, gen_kwargs, doc_to_visual, doc_id, task, split = args
      options = generation_options(gen_kwargs, self.max_new_tokens)
      try:
        image = self._image(doc_to_visual, task_dict, task, split, doc_id)
      except decode.SkipImage as e:
        self._skip(e, task, split, doc_id)
        out[i] = ""
        continue
      prompt = self._context(context)
      if options["greedy"]:
        greedy.setdefault(options["max_new_tokens"], []).append((i, prompt, image, options))
      else:
        text = self.model.answer(prompt, image, max_new_tokens=options["max_new_tokens"],
                                 temperature=options["temperature"], top_k=options["top_k"],
                                 top_p=options["top_p"], seed=self.seed + i)
        out[i] = stop_at(text, options["until"])
    for max_new_tokens, rows in greedy.items():
      for start in range(0, len(rows), self.batch_size):
        chunk = rows[start:start + self.batch_size]
        answers = self.model.answer_batch(
            [prompt for _, prompt, _, _ in chunk], [image for _, _, image, _ in chunk],
            max_new_tokens=max_new_tokens, batch_size=self.batch_size,
            length_bucket=self.length_bucket, mesh=self.mesh)
        for (i, _, _, options), text in zip(chunk, answers):
          out[i] = stop_at(text, options["until"])
    return out

  # ------------------------------------------------------------------ loglikelihood
  def loglikelihood(self, requests: Sequence[tuple], task_dict) -> list[tuple[float, bool]]:
    """(log p(continuation | context, image), is_greedy) of each request."""
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    rows = []
    for i, args in enumerate(requests):
      if len(args) == 2:
        (context, continuation), image = args, None
      elif len(args) == 6:
        context, target, doc_to_visual, doc_id, task, split = args
        continuation = target(task_dict[task][split][doc_id]) if callable(target) else target
        try:
          image = self._image(doc_to_visual, task_dict, task, split, doc_id)
        except decode.SkipImage as e:
          self._skip(e, task, split, doc_id)
          out[i] = (-math.inf, False)
          continue
      else:
        raise ValueError(f"a loglikelihood request has 6 arguments (context, continuation, "
                         f"doc_to_visual, doc_id, task, split) or 2, got {len(args)}")
      if isinstance(continuation, list):
        if len(continuation) != 1:
          raise ValueError(f"expected one continuation string, got {continuation!r}")
        continuation = continuation[0]
      rows.append((i, self._context(context), image, str(continuation).lstrip()))
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      scores = self.model.loglikelihood_batch([r[1:] for r in chunk], batch_size=self.batch_size,
                                              length_bucket=self.length_bucket, mesh=self.mesh)
      for (i, *_), score in zip(chunk, scores):
        out[i] = score
    return out
