"""The MLLM's text tokenizer files, of either kind, behind one small interface.

* SentencePiece `.model` files (Gemma, Llama 2), through `sentencepiece`;
* Hugging Face `tokenizer.json` files (Qwen2 / Qwen2.5, Llama 3), through the `tokenizers`
  library (a directory holding a `tokenizer.json` names that file).

The file is user-supplied, never downloaded; its bytes travel with the `Vocabulary` (so grain
workers can unpickle it) and are copied into the training workdir under `WORKDIR_FILES[kind]`.
Each backend gives `size` (ids the file defines, added tokens included), `piece_id` (None for a
piece it lacks), `encode` (no BOS/EOS added; a HF file's added special tokens written in the
text, e.g. ChatML's `<|im_start|>`, are recognised), `decode` (special pieces dropped) and its
own `bos_id` / `eos_id` / `pad_id` where the file states them (None otherwise).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

SENTENCEPIECE, HF_TOKENIZER = "sentencepiece", "hf_tokenizer"
KINDS = (SENTENCEPIECE, HF_TOKENIZER)
# The copy of the run's tokenizer inside its workdir, per kind.
WORKDIR_FILES = {SENTENCEPIECE: "sentencepiece.model", HF_TOKENIZER: "tokenizer.json"}


def resolve(path: str | Path) -> tuple[Path, str]:
  """(the tokenizer file, its kind) of `path`: a `.json` file is a HF tokenizer, a directory
  holding `tokenizer.json` names that file, anything else is a SentencePiece model."""
  path = Path(path)
  if path.is_dir():
    for kind, name in ((HF_TOKENIZER, "tokenizer.json"), (SENTENCEPIECE, "tokenizer.model")):
      if (path / name).is_file():
        return path / name, kind
    raise FileNotFoundError(f"tokenizer directory {path} holds neither tokenizer.json (HF) nor "
                            "tokenizer.model (SentencePiece)")
  if not path.is_file():
    raise FileNotFoundError(f"tokenizer file not found: {path} (a SentencePiece .model or a HF "
                            "tokenizer.json)")
  return path, (HF_TOKENIZER if path.suffix.lower() == ".json" else SENTENCEPIECE)


def workdir_file(workdir: str | Path) -> Path | None:
  """The tokenizer copy a training run left in `workdir`, if any."""
  for name in WORKDIR_FILES.values():
    if (Path(workdir) / name).is_file():
      return Path(workdir) / name
  return None


class _Backend:
  """Holds the file's bytes; the processor is built lazily (and dropped when pickled)."""
  kind = ""

  def __init__(self, data: bytes):
    self.data = data

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop("processor", None)
    return state


class SentencePieceText(_Backend):
  kind = SENTENCEPIECE

  @functools.cached_property
  def processor(self):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    return spm.SentencePieceProcessor(model_proto=self.data)

  @property
  def size(self) -> int:
    return self.processor.get_piece_size()

  def piece_id(self, piece: str) -> int | None:
    sp = self.processor
    found = sp.piece_to_id(piece)
    return None if found == sp.unk_id() and piece != sp.id_to_piece(sp.unk_id()) else int(found)

  def encode(self, text: str) -> list[int]:
    return self.processor.encode(text) if text else []

  def decode(self, ids: Sequence[int]) -> str:
    return self.processor.decode([int(i) for i in ids])

  @property
  def own_ids(self) -> dict[str, int | None]:
    sp = self.processor
    return dict(bos=_id(sp.bos_id()), eos=_id(sp.eos_id()), pad=_id(sp.pad_id()))


class HFText(_Backend):
  kind = HF_TOKENIZER

  @functools.cached_property
  def processor(self):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("a HF tokenizer.json needs the `tokenizers` package: "
                        "`pip install tokenizers`") from e
    return tokenizers.Tokenizer.from_str(self.data.decode("utf-8"))

  @property
  def size(self) -> int:
    return self.processor.get_vocab_size(with_added_tokens=True)

  def piece_id(self, piece: str) -> int | None:
    found = self.processor.token_to_id(piece)
    return None if found is None else int(found)

  def encode(self, text: str) -> list[int]:
    return list(self.processor.encode(text, add_special_tokens=False).ids) if text else []

  def decode(self, ids: Sequence[int]) -> str:
    return self.processor.decode([int(i) for i in ids], skip_special_tokens=True)

  @property
  def own_ids(self) -> dict[str, int | None]:
    return dict(bos=None, eos=None, pad=None)  # tokenizer.json does not say; the template does


def _id(i: int) -> int | None:
  return None if i < 0 else int(i)


BACKENDS = {SENTENCEPIECE: SentencePieceText, HF_TOKENIZER: HFText}


def load(path: str | Path) -> _Backend:
  file, kind = resolve(path)
  return BACKENDS[kind](file.read_bytes())
