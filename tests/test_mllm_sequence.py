"""MLLM sequences: vocabulary and special tokens, LLaVA conversations laid out against
hand-built expectations, answer-only loss, causal vs prefix-LM masks, chat prompts."""

import json

import numpy as np
import pytest

import mllm_testdata as T
from dualtoken_jax import config_files
from dualtoken_jax.llm import get_config, masks
from dualtoken_jax.mllm import config as C
from dualtoken_jax.mllm import sequence
from dualtoken_jax.mllm.sequence import SkipExample

N = 16  # image positions of configs/mllm_tiny.py (32 px tokenizer, patch 8)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  return T.train_spm(tmp_path_factory.mktemp("spm") / "t.model", T.corpus())


@pytest.fixture(scope="module")
def vocab(spm_path):
  return sequence.Vocabulary.load(spm_path, C.DEFAULT_SPECIAL_TOKENS)


def layout(attention="causal", max_len=64):
  config = config_files.load(f"mllm_tiny:attention={attention}")
  config.data.max_len = max_len
  return sequence.Layout.from_config(config)


def test_special_tokens_are_appended_or_reused(tmp_path, vocab):
  # Pieces the model lacks are appended after its vocabulary, in config order.
  assert vocab.num_pieces == 120
  assert vocab.special == {"image_start": 120, "image_end": 121, "image_gen_start": 122,
                           "image_gen_end": 123} and vocab.size == 124
  assert (vocab.bos_id, vocab.eos_id, vocab.pad_id) == (2, 1, 0)
  # A piece the model has keeps its id (e.g. Gemma 3's <start_of_image>): no new row.
  import io, sentencepiece as spm  # pylint: disable=g-import-not-at-top,multiple-imports
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(T.corpus()), model_writer=model,
                                 vocab_size=60, hard_vocab_limit=False, pad_id=0, eos_id=1,
                                 bos_id=2, unk_id=3, user_defined_symbols=["<start_of_image>"],
                                 minloglevel=2)
  own = sequence.Vocabulary(model.getvalue(), C.DEFAULT_SPECIAL_TOKENS)
  assert own.special["image_start"] == own.processor.piece_to_id("<start_of_image>") < own.num_pieces
  assert own.special["image_end"] == own.num_pieces and own.size == own.num_pieces + 3


def test_llm_config_must_agree_with_the_vocabulary(vocab):
  vocab.check_llm(get_config("tiny", vocab_size=124))
  with pytest.raises(ValueError, match=r"vocab_size 123 < 124 .*120 pieces \+ 4 appended"):
    vocab.check_llm(get_config("tiny", vocab_size=123))
  with pytest.raises(ValueError, match="bos_id 5 but the SentencePiece BOS is 2"):
    vocab.check_llm(get_config("tiny", vocab_size=128, bos_id=5))
  with pytest.raises(FileNotFoundError, match="SentencePiece model file not found"):
    sequence.Vocabulary.load("/nonexistent/x.model")


def _hand_built(vocab, question, answer):
  """The tiny template ("{text}\\n" for users, "{text}" + EOS for the model), by hand."""
  start, end = vocab.special["image_start"], vocab.special["image_end"]
  prompt = [2, start] + [0] * N + [end] + vocab.processor.encode("\n" + question + "\n")
  return prompt, vocab.processor.encode(answer) + [1]


@pytest.mark.parametrize("attention", ["causal", "prefix_lm"])
def test_single_turn_layout_loss_and_mask_ar(vocab, attention):
  conv = T.conversation("x.jpg", "What is in this picture?", "a cat")["conversations"]
  ex = sequence.build_example(vocab, layout(attention), conv, has_image=True)
  prompt, answer = _hand_built(vocab, "What is in this picture?", "a cat")
  n = len(prompt) + len(answer)
  np.testing.assert_array_equal(ex["tokens"], prompt + answer + [0] * (64 - n))
  np.testing.assert_array_equal(ex["image_mask"], [False, False] + [True] * N + [False] * (62 - N))
  np.testing.assert_array_equal(ex["input_mask"], [True] * n + [False] * (64 - n))
  # The loss scores exactly the answer and its EOS.
  np.testing.assert_array_equal(np.flatnonzero(ex["loss_mask"]), np.arange(len(prompt), n))
  expected_ar = np.ones(64, np.int32)
  if attention == "prefix_lm":
    expected_ar[:len(prompt)] = 0
  np.testing.assert_array_equal(ex["mask_ar"], expected_ar)


def test_prefix_lm_sees_the_whole_prompt_and_answers_stay_causal(vocab):
  conv = T.conversation("x.jpg", "Describe the image.", "a rocket")["conversations"]
  first_answer = len(_hand_built(vocab, "Describe the image.", "a rocket")[0])
  image_pos, prompt_pos = 2, first_answer - 1
  attend = {}
  for attention in ("causal", "prefix_lm"):
    ex = sequence.build_example(vocab, layout(attention), conv, has_image=True)
    attend[attention] = np.asarray(masks.make_attn_mask(ex["input_mask"][None],
                                                        ex["mask_ar"][None]))[0]
  causal, prefix = attend["causal"], attend["prefix_lm"]
  n = first_answer + 3
  np.testing.assert_array_equal(causal[:n, :n], np.tril(np.ones((n, n), bool)))
  assert prefix[image_pos, prompt_pos] and not causal[image_pos, prompt_pos]  # image sees text
  assert prefix[:first_answer, :first_answer].all()                        # one block
  assert not prefix[:first_answer, first_answer:].any()                    # no peeking
  np.testing.assert_array_equal(prefix[first_answer:n, first_answer:n],
                                np.tril(np.ones((n - first_answer,) * 2, bool)))
  assert not prefix[:, n:].any() and not causal[:, n:].any()               # padding keys


def test_multi_turn_scores_every_model_turn_only(vocab):
  conv = [{"from": "human", "value": "<image>\nWhat do you see?"}, {"from": "gpt", "value": "a cat"},
          {"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": "a flower"}]
  ex = sequence.build_example(vocab, layout("prefix_lm"), conv, has_image=True)
  p1, a1 = _hand_built(vocab, "What do you see?", "a cat")
  p2 = vocab.processor.encode("Describe the image.\n")
  a2 = vocab.processor.encode("a flower") + [1]
  expected = p1 + a1 + p2 + a2
  np.testing.assert_array_equal(ex["tokens"][:len(expected)], expected)
  scored = list(range(len(p1), len(p1) + len(a1))) + list(
      range(len(p1 + a1 + p2), len(expected)))
  np.testing.assert_array_equal(np.flatnonzero(ex["loss_mask"]), scored)
  assert (ex["mask_ar"][:len(p1)] == 0).all() and (ex["mask_ar"][len(p1):] == 1).all()


def test_marker_placement_text_only_and_chat_prompt(vocab):
  lay = layout()
  # No <image> marker: LLaVA's rule puts "<image>\n" in front of the first human turn.
  without = sequence.build_example(vocab, lay, T.conversation("x.jpg", "What do you see?", "a cat",
                                                              marker=False)["conversations"], True)
  marked = sequence.build_example(vocab, lay, T.conversation("x.jpg", "What do you see?",
                                                             "a cat")["conversations"], True)
  for k in marked:
    np.testing.assert_array_equal(without[k], marked[k])
  # A marker in the middle of the text puts the image block there.
  mid = sequence.build_example(vocab, lay, [{"from": "human", "value": "Look: <image> what?"},
                                            {"from": "gpt", "value": "a cat"}], True)
  before = vocab.processor.encode("Look: ")
  assert list(mid["tokens"][1:1 + len(before)]) == before
  assert mid["tokens"][1 + len(before)] == vocab.special["image_start"]
  # Text-only samples have no image block.
  text = sequence.build_example(vocab, lay, T.conversation(None, "Describe the image.", "a cat",
                                                           marker=False)["conversations"], False)
  assert not text["image_mask"].any() and vocab.special["image_start"] not in text["tokens"]
  # A chat prompt is exactly the training prompt: the answer is generated where it was scored.
  prompt = sequence.build_prompt(vocab, lay, "What do you see?", has_image=True)
  n = len(prompt["tokens"])
  np.testing.assert_array_equal(prompt["tokens"], marked["tokens"][:n])
  np.testing.assert_array_equal(prompt["image_mask"], marked["image_mask"][:n])
  assert marked["loss_mask"][n] and not marked["loss_mask"][:n].any()


@pytest.mark.parametrize("conv,has_image,message", [
    ([], True, "non-empty list"),
    ([{"from": "gpt", "value": "a cat"}, {"from": "human", "value": "hi"}], True, "alternate"),
    ([{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}], True, "role 'robot'"),
    ([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "b"}], True,
     "2 <image> markers for one image"),
    ([{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "b"}], False,
     "1 <image> markers for no image"),
    ([{"from": "human", "value": "what?"}], True, "no model turn"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}], True, "value"),
])
def test_bad_conversations_are_skipped_with_a_reason(vocab, conv, has_image, message):
  with pytest.raises(SkipExample, match=message) as e:
    sequence.build_example(vocab, layout(), conv, has_image)
  assert e.value.reason == "bad_conversation"


def test_too_long_is_skipped_not_truncated(vocab):
  conv = T.conversation("x.jpg", "What is in this picture?", "a cup of coffee")["conversations"]
  with pytest.raises(SkipExample, match="tokens > max_len 30") as e:
    sequence.build_example(vocab, layout(max_len=30), conv, True)
  assert e.value.reason == "too_long"


def test_vocabulary_pickles_for_worker_processes(vocab):
  import pickle  # pylint: disable=g-import-not-at-top
  copy = pickle.loads(pickle.dumps(vocab))
  assert copy.encode("a cat") == vocab.encode("a cat") and copy.special == vocab.special
  assert json.dumps(copy.special)  # plain ints


def test_llama2_multi_turn_repeats_bos_before_every_question(vocab):
  """Llama 2 chat: <s>[INST] q1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>, in training and
  in a chat prompt with history alike."""
  config = config_files.load("mllm_tiny")
  config.text.template = dict(C.TEMPLATES["llama2"])
  config.data.max_len = 128
  lay = sequence.Layout.from_config(config)
  turns = [{"from": "human", "value": "what is it"}, {"from": "gpt", "value": "a cat"},
           {"from": "human", "value": "and now"}, {"from": "gpt", "value": "a dog"}]
  ex = sequence.build_example(vocab, lay, turns, has_image=False)
  tokens = list(ex["tokens"][ex["input_mask"]])
  enc = vocab.encode
  expected = ([vocab.bos_id] + enc("[INST] what is it [/INST]") + enc(" a cat ") + [vocab.eos_id]
              + [vocab.bos_id] + enc("[INST] and now [/INST]") + enc(" a dog ") + [vocab.eos_id])
  assert tokens == expected
  prompt = sequence.build_prompt(vocab, lay, "and now", has_image=False,
                                 history=[("what is it", "a cat")])
  assert list(prompt["tokens"]) == expected[:expected.index(vocab.eos_id) + 1] + (
      [vocab.bos_id] + enc("[INST] and now [/INST]"))
  # One-turn layouts (every other template) are unchanged: a single BOS.
  gemma = sequence.Layout.from_config(config_files.load("mllm_tiny"))
  one = sequence.build_example(vocab, gemma, turns, has_image=False)
  assert list(one["tokens"][one["input_mask"]]).count(vocab.bos_id) == 1
