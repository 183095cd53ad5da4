"""SigLIP text input: SentencePiece tokenisation with SigLIP's conventions, and the text tower.

`SigLIPTokenizer` reproduces what the reference feeds its SigLIP text tower (open_clip's
`HFTokenizer(clean="canonicalize")` over the checkpoint's SentencePiece model, which matches
big_vision's `tokenize(max_len, eos="sticky", pad_value=1)`):

  1. canonicalise: HTML entities unescaped, "_" -> " ", ASCII punctuation removed, lower-cased,
     runs of whitespace collapsed (open_clip's `canonicalize_text`; its `ftfy` mojibake repair
     is not applied);
  2. SentencePiece ids of the text, no BOS;
  3. truncated to `max_len - 1` ids and **EOS appended** (always present, "sticky");
  4. padded on the right to exactly `max_len` with the pad id, which is the EOS id: SigLIP
     pads with `</s>` (id 1 in its c4_en / mc4 models), not with SentencePiece's `<pad>`.

The tower reads the *last* position (`TextTower`: `x[:, -1]`), so step 4 is what SigLIP was
trained with and must not be skipped.
"""

from __future__ import annotations

import functools
import html
import os
import string
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dualtoken_jax.models.dualtoken import DualToken

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str) -> str:
  """open_clip's `canonicalize_text` after its HTML unescaping (see the module docstring)."""
  text = html.unescape(html.unescape(text)).strip()
  text = text.replace("_", " ").translate(_PUNCTUATION).lower()
  return " ".join(text.split())


class SigLIPTokenizer:
  """Text -> int32 (N, max_len) token ids for the SigLIP text tower (module docstring)."""

  def __init__(self, model_file: str | os.PathLike, max_len: int,
               vocab_size: int | None = None):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    if not model_file or not os.path.isfile(model_file):
      raise FileNotFoundError(
          f"SentencePiece model {model_file!r} not found: zero-shot and retrieval need the "
          ".model file the SigLIP checkpoint was trained with (big_vision's c4_en / mc4 "
          "models, or `spiece.model` of the Hugging Face SigLIP repo); pass "
          "--sentencepiece_model")
    self._sp = sentencepiece.SentencePieceProcessor(model_file=os.fspath(model_file))
    self.eos_id = int(self._sp.eos_id())
    if self.eos_id < 0:
      raise ValueError(f"{model_file} defines no EOS piece; SigLIP tokenisation appends and "
                       "pads with EOS")
    if max_len < 2:
      raise ValueError(f"max_len must be at least 2 (one token + EOS), got {max_len}")
    self.max_len = int(max_len)
    self.vocab_size = int(self._sp.get_piece_size())
    if vocab_size is not None and self.vocab_size > vocab_size:
      raise ValueError(f"SentencePiece model {model_file} has {self.vocab_size} pieces but the "
                       f"text tower embeds only {vocab_size}: wrong .model for this checkpoint")

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    ids = self._sp.encode([canonicalize(t) for t in texts])
    out = np.full((len(ids), self.max_len), self.eos_id, np.int32)
    for i, row in enumerate(ids):
      row = row[:self.max_len - 1]
      out[i, :len(row)] = row  # then EOS, then EOS padding
    return out


@functools.lru_cache(maxsize=8)
def _encode_fn(model: DualToken, mesh: Mesh):
  batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  return jax.jit(lambda v, t: model.apply(v, t, method=DualToken.encode_text),
                 out_shardings=batch)


def encode_texts(model: DualToken, variables, tokens: np.ndarray, mesh: Mesh,
                 batch_size: int = 256) -> np.ndarray:
  """L2-normalised text embeddings (N, D) float32 of token ids (N, L), sharded over `mesh`.

  Every process passes the same `tokens` and gets all N embeddings. Chunks are padded to a
  multiple of the mesh's batch shards, so one compiled shape serves every chunk.
  """
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_size = max(shards, -(-batch_size // shards) * shards)
  sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  fn = _encode_fn(model, mesh)
  out = []
  for start in range(0, len(tokens), batch_size):
    chunk = tokens[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    emb = fn(variables, jax.make_array_from_callback(chunk.shape, sharding,
                                                     lambda idx, c=chunk: c[idx]))
    out.append(fetch(emb)[:n])
  if not out:
    return np.zeros((0, 0), np.float32)
  return np.concatenate(out).astype(np.float32)


def fetch(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host) array in full on this host."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def check_text_tower(config) -> None:
  if config.text is None:
    raise ValueError("zero-shot and retrieval need the SigLIP text tower, but this tokenizer's "
                     "config has none (config.text is None)")

