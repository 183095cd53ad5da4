"""Token sequences of the MLLM: vocabulary, LLaVA conversations, image blocks, loss and masks.

Layout of one example (right-padded to `max_len`):

  <bos> user-turn(... <image_start> [N image positions] <image_end> ...) model-turn <eos>? ...

* Text comes from a tokenizer file of either kind (`text_tokenizers`): a SentencePiece model
  (Gemma, Llama 2) or a HF `tokenizer.json` (Qwen2.5, Llama 3). Special tokens are pieces
  (`<start_of_image>`, ...): a piece the tokenizer already has keeps its id (Gemma 3's image
  delimiters, Gemma's `<unusedK>` rows, Qwen2.5's `<|vision_start|>`, Llama 3's reserved
  tokens), any other is appended after its vocabulary, in config order, so new embedding rows
  get initialised when an LLM checkpoint is loaded (or reuse a table's padding rows).
* Conversations are LLaVA's layout: `{"image": path, "conversations": [{"from": "human",
  "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}`. The image block
  replaces the `<image>` marker; a sample with an image but no marker gets "<image>\\n" in
  front of its first human turn (what LLaVA's preprocessing does), in training and in chat.
* Turns are formatted by the template (`user`/`model` strings around `{text}`; the family's
  own chat format, `mllm.config.TEMPLATES`). Every sequence starts with BOS (unless the
  template's `add_bos` is false, as in Qwen's ChatML) and the template's `prefix` (e.g. a
  system turn). Only model turns are scored: `loss_mask[t]` is True when token t is a target,
  predicted at t - 1.
* Attention: `mask_ar` in PaliGemma's convention (`llm.masks.make_attn_mask`). "causal" sets
  1 everywhere; "prefix_lm" sets 0 up to the first scored token (image and first prompt see
  each other) and 1 from there on, so answers and later turns stay causal.

Generation examples (part 2) reverse the order: the caption is the user turn and the model
turn is `<image_gen_start> [N image positions] <image_gen_end>` inside the model template.
`gen_mask` marks those N positions: their codes are the heads' targets (predicted from the
hidden state one position earlier) and never enter the text loss; `<image_gen_end>` and the
rest of the model turn are scored as text. The CFG unconditional prompt is the same layout
with an empty caption (`build_generation_prompt(..., "")`).

Image positions hold the pad id in `tokens`; the model puts projected visual vectors there
(`image_mask`). Everything here is host-side numpy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dualtoken_jax.data import records
from dualtoken_jax.mllm import config as mllm_config
from dualtoken_jax.mllm import text_tokenizers

# Why an MLLM sample is skipped: the image reasons plus the MLLM's own (`SkipExample.reason`
# is one of these; the codes ones come from `data.PrepareExample`).
SKIPS = records.IMAGE_SKIPS.extend("bad_conversation", "too_long", "missing_codes",
                                   "bad_codes", "bad_caption")
IMAGE_MARKER = "<image>"
USER_ROLES = ("human", "user")
MODEL_ROLES = ("gpt", "assistant", "model")


class SkipExample(ValueError):
  """A sample that cannot become a training example; `reason` (one of `SKIPS`) names why."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


# ---------------------------------------------------------------- vocabulary
_KIND_NAMES = {text_tokenizers.SENTENCEPIECE: "SentencePiece",
               text_tokenizers.HF_TOKENIZER: "HF tokenizer"}


class Vocabulary:
  """A text tokenizer (SentencePiece or HF `tokenizer.json`) plus the special tokens, with the
  ids the LLM must agree on.

  `pieces` (role -> piece, from the template's `bos` / `eos` / `pad`; "" = the tokenizer's own)
  name the BOS, EOS and pad pieces: a SentencePiece model states its own, a HF tokenizer.json
  does not (its family's template names them). The pad id defaults to 0 (SentencePiece) or EOS.
  """

  def __init__(self, model_proto: bytes, special_tokens: Sequence[Sequence[str]],
               kind: str = text_tokenizers.SENTENCEPIECE, pieces: Mapping[str, str] | None = None):
    if kind not in text_tokenizers.BACKENDS:
      raise ValueError(f"tokenizer kind {kind!r} is not one of {text_tokenizers.KINDS}")
    self.kind = kind
    self._text = text_tokenizers.BACKENDS[kind](model_proto)
    self.num_pieces = self._text.size
    self.special: dict[str, int] = {}
    appended = 0
    for name, piece in special_tokens:
      found = self._text.piece_id(piece)
      if found is None:
        found = self.num_pieces + appended
        appended += 1
      self.special[name] = int(found)
    self.size = self.num_pieces + appended
    ids = dict(self._text.own_ids)
    for role, piece in (pieces or {}).items():
      if piece:
        ids[role] = self._text.piece_id(piece)
        if ids[role] is None:
          raise ValueError(f"the {_KIND_NAMES[kind]} has no piece {piece!r} (text.template.{role})")
    self.bos_id, self.eos_id = ids["bos"], ids["eos"]
    default_pad = 0 if kind == text_tokenizers.SENTENCEPIECE else self.eos_id
    self.pad_id = default_pad if ids.get("pad") is None else ids["pad"]
    if self.bos_id is None or self.eos_id is None:
      raise ValueError(f"the {_KIND_NAMES[kind]} needs BOS and EOS pieces (bos_id {self.bos_id}, "
                       f"eos_id {self.eos_id}; a HF tokenizer's come from text.template.bos/eos)")

  @classmethod
  def load(cls, path: str | Path, special_tokens=mllm_config.DEFAULT_SPECIAL_TOKENS,
           pieces: Mapping[str, str] | None = None):
    """A SentencePiece `.model` or a HF `tokenizer.json` (or a directory holding one)."""
    path = Path(path)
    if not path.exists() and path.suffix.lower() != ".json":
      raise FileNotFoundError(f"SentencePiece model file not found: {path}")
    file, kind = text_tokenizers.resolve(path)
    return cls(file.read_bytes(), special_tokens, kind, pieces)

  @classmethod
  def from_text_config(cls, text, special_tokens):
    """The vocabulary of an MLLM config's `text` section (`tokenizer` path, template pieces)."""
    return cls.load(mllm_config.tokenizer_path(text), special_tokens,
                    mllm_config.template_pieces(text.template))

  @property
  def processor(self):
    """The backend's processor (`sentencepiece.SentencePieceProcessor` or
    `tokenizers.Tokenizer`)."""
    return self._text.processor

  @property
  def model_proto(self) -> bytes:
    """The tokenizer file's bytes."""
    return self._text.data

  @property
  def workdir_file(self) -> str:
    """The name of this kind's copy inside a training workdir."""
    return text_tokenizers.WORKDIR_FILES[self.kind]

  def encode(self, text: str) -> list[int]:
    return self._text.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; appended special tokens and control pieces are dropped."""
    return self._text.decode([int(i) for i in ids if 0 <= i < self.num_pieces])

  def check_llm(self, llm) -> None:
    """Raises ValueError if the decoder config disagrees with this vocabulary."""
    problems = []
    if llm.vocab_size < self.size:
      problems.append(f"llm.vocab_size {llm.vocab_size} < {self.size} (the {_KIND_NAMES[self.kind]}"
                      f"'s {self.num_pieces} pieces + {self.size - self.num_pieces} "
                      f"appended special tokens)")
    name = _KIND_NAMES[self.kind]
    if llm.bos_id != self.bos_id:
      problems.append(f"llm.bos_id {llm.bos_id} but the {name} BOS is {self.bos_id}")
    if self.eos_id not in tuple(llm.eos_ids):
      problems.append(f"llm.eos_ids {tuple(llm.eos_ids)} lack the {name} EOS {self.eos_id}")
    if problems:
      raise ValueError("LLM config and vocabulary disagree: " + "; ".join(problems))


# ---------------------------------------------------------------- conversations
@dataclasses.dataclass(frozen=True)
class Layout:
  """What turns a conversation into arrays (hashable: lives in grain transforms)."""
  template_user: str
  template_model: str
  append_eos: bool
  num_image_positions: int
  max_len: int
  prefix_lm: bool
  add_bos: bool = True   # start every sequence with BOS (not Qwen's ChatML)
  prefix: str = ""       # text after BOS at the start of every sequence (e.g. a system turn)
  turn_bos: bool = False  # BOS again before every later user turn (Llama 2: `</s><s>[INST]`)

  @classmethod
  def from_config(cls, config) -> "Layout":
    t = config.text.template
    return cls(t.user, t.model, bool(t.append_eos),
               mllm_config.num_image_positions(config.model), int(config.data.max_len),
               config.model.attention == "prefix_lm", bool(t.get("add_bos", True)),
               str(t.get("prefix", "")), bool(t.get("turn_bos", False)))


def _start(vocab: Vocabulary, layout: Layout) -> list[int]:
  """The tokens every sequence starts with: BOS (where the template adds it) and the prefix."""
  return ([vocab.bos_id] if layout.add_bos else []) + vocab.encode(layout.prefix)


def parse_turns(conversations: Any, has_image: bool) -> list[tuple[str, str]]:
  """LLaVA `conversations` -> [(role "user"|"model", text)], checked; the image marker is
  added in front of the first user turn when the sample has an image but no marker."""
  if not isinstance(conversations, list) or not conversations:
    raise SkipExample("bad_conversation", "conversations must be a non-empty list of turns")
  turns = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
      raise SkipExample("bad_conversation", f"turn {i} must be {{'from': ..., 'value': str}}")
    role = str(turn.get("from", "")).lower()
    if role in USER_ROLES:
      role = "user"
    elif role in MODEL_ROLES:
      role = "model"
    else:
      raise SkipExample("bad_conversation", f"turn {i} has role {turn.get('from')!r}; expected "
                                            f"one of {USER_ROLES + MODEL_ROLES}")
    expected = "user" if i % 2 == 0 else "model"
    if role != expected:
      raise SkipExample("bad_conversation", f"turn {i} is a {role} turn; turns must alternate "
                                            "user, model, user, ... starting with the user")
    turns.append((role, turn["value"]))
  if len(turns) < 2:
    raise SkipExample("bad_conversation", "no model turn to learn from")
  markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
  if has_image and markers == 0:
    turns[0] = ("user", IMAGE_MARKER + "\n" + turns[0][1])
  elif markers != (1 if has_image else 0):
    raise SkipExample("bad_conversation", f"{markers} {IMAGE_MARKER} markers for "
                                          f"{'one image' if has_image else 'no image'}")
  return turns


def _user_segment(vocab: Vocabulary, layout: Layout, text: str):
  """Tokens and image flags of a formatted user turn, the marker replaced by the image block."""
  formatted = layout.template_user.replace("{text}", text)
  tokens, image = [], []
  for k, part in enumerate(formatted.split(IMAGE_MARKER)):
    if k:
      block = ([vocab.special[mllm_config.IMAGE_START]]
               + [vocab.pad_id] * layout.num_image_positions
               + [vocab.special[mllm_config.IMAGE_END]])
      tokens += block
      image += [False] + [True] * layout.num_image_positions + [False]
    ids = vocab.encode(part)
    tokens += ids
    image += [False] * len(ids)
  return tokens, image


def _turn_segment(vocab: Vocabulary, layout: Layout, role: str, text: str, first: bool):
  """Tokens and image flags of one formatted turn (a model turn ends with EOS where the
  template appends it; a later user turn starts with BOS where it says `turn_bos`)."""
  if role == "user":
    tokens, image = _user_segment(vocab, layout, text)
    if layout.turn_bos and not first:
      tokens, image = [vocab.bos_id] + tokens, [False] + image
    return tokens, image
  ids = vocab.encode(layout.template_model.replace("{text}", text))
  ids += [vocab.eos_id] if layout.append_eos else []
  return ids, [False] * len(ids)


def build_example(vocab: Vocabulary, layout: Layout, conversations: Any,
                  has_image: bool) -> dict[str, np.ndarray]:
  """One right-padded training example: tokens, image_mask, input_mask, loss_mask, mask_ar
  (each (max_len,)). Raises SkipExample("bad_conversation" | "too_long"): a sequence longer
  than max_len is skipped, not truncated (a cut answer would teach the model to stop early)."""
  tokens = _start(vocab, layout)
  image, loss = [False] * len(tokens), [False] * len(tokens)
  for i, (role, text) in enumerate(parse_turns(conversations, has_image)):
    ids, img = _turn_segment(vocab, layout, role, text, first=i == 0)
    tokens += ids
    image += img
    loss += [role == "model"] * len(ids)
  if len(tokens) > layout.max_len:  # never truncated silently: skipped and counted
    raise SkipExample("too_long", f"{len(tokens)} tokens > max_len {layout.max_len}")
  return pad_example(np.array(tokens, np.int32), np.array(image), np.array(loss), layout.max_len,
                     vocab.pad_id, layout.prefix_lm)


def _generation_turns(vocab: Vocabulary, layout: Layout, caption: str):
  """(tokens, image flags, scored flags) of a caption turn and the model turn around the
  generated image block."""
  if not isinstance(caption, str):
    raise SkipExample("bad_caption", f"caption must be a string, got {type(caption).__name__}")
  tokens, image = _user_segment(vocab, layout, caption.replace(IMAGE_MARKER, ""))
  loss = [False] * len(tokens)
  before, _, after = layout.template_model.partition("{text}")
  n = layout.num_image_positions
  for part, block in ((before, True), (after, False)):
    ids = vocab.encode(part)
    tokens, image, loss = tokens + ids, image + [False] * len(ids), loss + [True] * len(ids)
    if block:
      tokens += ([vocab.special[mllm_config.GEN_START]] + [vocab.pad_id] * n
                 + [vocab.special[mllm_config.GEN_END]])
      image += [False] + [True] * n + [False]
      loss += [True] + [False] * n + [True]
  if layout.append_eos:
    tokens, image, loss = tokens + [vocab.eos_id], image + [False], loss + [True]
  start = _start(vocab, layout)
  return start + tokens, [False] * len(start) + image, [False] * len(start) + loss


def build_generation_example(vocab: Vocabulary, layout: Layout,
                             caption: str) -> dict[str, np.ndarray]:
  """One right-padded caption -> image example; like `build_example` plus `gen_mask`."""
  tokens, image, loss = _generation_turns(vocab, layout, caption)
  if len(tokens) > layout.max_len:
    raise SkipExample("too_long", f"{len(tokens)} tokens > max_len {layout.max_len}")
  out = pad_example(np.array(tokens, np.int32), np.array(image), np.array(loss), layout.max_len,
                    vocab.pad_id, layout.prefix_lm)
  out["gen_mask"] = out["image_mask"].copy()
  return out


def build_generation_prompt(vocab: Vocabulary, layout: Layout,
                            caption: str) -> dict[str, np.ndarray]:
  """The unpadded prompt of generation, ending with `<image_gen_start>` (whose hidden state
  predicts the first image position): tokens, mask_ar. "" is the unconditional prompt."""
  tokens, _, loss = _generation_turns(vocab, layout, caption)
  end = tokens.index(vocab.special[mllm_config.GEN_START]) + 1
  loss = np.asarray(loss[:end], bool)
  return dict(tokens=np.array(tokens[:end], np.int32), mask_ar=mask_ar(loss, layout.prefix_lm))


def pad_example(tokens, image, loss, max_len: int, pad_id: int, prefix_lm: bool):
  """Arrays of one sequence of n <= max_len tokens -> the padded example dict (`gen_mask`
  all False: understanding)."""
  n = len(tokens)
  out = dict(tokens=np.full(max_len, pad_id, np.int32), image_mask=np.zeros(max_len, bool),
             input_mask=np.zeros(max_len, bool), loss_mask=np.zeros(max_len, bool),
             mask_ar=np.ones(max_len, np.int32), gen_mask=np.zeros(max_len, bool))
  out["tokens"][:n], out["image_mask"][:n], out["loss_mask"][:n] = tokens, image, loss
  out["input_mask"][:n] = True
  out["mask_ar"][:n] = mask_ar(np.asarray(loss, bool), prefix_lm)
  return out


def mask_ar(loss, prefix_lm: bool) -> np.ndarray:
  """(n,) PaliGemma mask_ar: all 1 (causal), or 0 before the first scored token (prefix-LM)."""
  out = np.ones(len(loss), np.int32)
  if prefix_lm:
    first = int(np.argmax(loss)) if np.any(loss) else len(loss)
    out[:first] = 0
  return out


def build_prompt(vocab: Vocabulary, layout: Layout, prompt: str, has_image: bool,
                 history: Sequence[tuple[str, str]] = ()) -> dict[str, np.ndarray]:
  """The unpadded prompt of a chat turn (ending where the model's answer starts):
  tokens, image_mask, mask_ar. `history` holds the earlier (question, answer) turns of a
  multi-turn chat, laid out as in training (`build_example`; the image marker goes to the first
  question). mask_ar is training's too: for prefix-LM 0 before the first answer token (the
  whole prompt when there is no history), else 1."""
  conversation = []
  for question, answer in [*history, (prompt, "")]:
    conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
  tokens = _start(vocab, layout)
  image, scored = [False] * len(tokens), [False] * len(tokens)
  for i, (role, text) in enumerate(parse_turns(conversation, has_image)[:-1]):  # no empty answer
    ids, img = _turn_segment(vocab, layout, role, text, first=i == 0)
    tokens += ids
    image += img
    scored += [role == "model"] * len(ids)
  return dict(tokens=np.array(tokens, np.int32), image_mask=np.array(image, bool),
              mask_ar=mask_ar(np.array(scored, bool), layout.prefix_lm))
