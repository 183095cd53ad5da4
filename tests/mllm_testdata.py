"""Test data of the MLLM tests: a SentencePiece model trained on the spot, and LLaVA-style
conversations about the photos bundled with scikit-image / scikit-learn / matplotlib."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import jax

from dualtoken_jax import config_files
from dualtoken_jax.mllm import demo
from dualtoken_jax.mllm import state as mllm_state
from dualtoken_jax.tokenizer import DualTokenizer

# The demo's photos, texts and SentencePiece trainer are the tests' data too.
ANSWERS = demo.ANSWERS
TRAIN_QUESTIONS = demo.TRAIN_QUESTIONS
HELD_OUT_QUESTION = demo.HELD_OUT_QUESTION
photos = demo.photos
conversation = demo.conversation
photo_conversations = demo.photo_conversations
photo_captions = demo.photo_captions
train_spm = demo.train_spm
corpus = demo.corpus


def write_json(path: Path, items) -> Path:
  path.write_text(json.dumps(list(items)))
  return path


@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> str:
  """A random tokenizer of configs/mllm_tiny.py saved once per test session (its init is the
  slowest compile of these tests): MLLM configs load it through `config.init.tokenizer`, the
  tokenize CLI through `--checkpoint`."""
  root = tempfile.mkdtemp(prefix="mllm_tokenizer_")
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  config = config_files.load("mllm_tiny")
  variables = jax.jit(lambda: mllm_state._random_tokenizer(config))()  # pylint: disable=protected-access
  DualTokenizer(config.model.tokenizer, jax.device_get(variables)).save(f"{root}/tok")
  return f"{root}/tok"
