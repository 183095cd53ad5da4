"""MLLM conversation data: JSON/JSONL sources, images or pre-computed codes from the
`tokenize` CLI, bad samples skipped and counted, a resumable grain stream, the eval set."""

import json

import numpy as np
import pytest

import mllm_testdata as T
from dualtoken_jax import config_files, tokenize
from dualtoken_jax.data import code_shards
from dualtoken_jax.data import load_image
from dualtoken_jax.mllm import caption_data as CD
from dualtoken_jax.mllm import data as D
from dualtoken_jax.mllm import sequence


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("data")
  config = config_files.load("mllm_tiny")
  vocab = sequence.Vocabulary.load(T.train_spm(tmp / "t.model", T.corpus()),
                                   config.model.special_tokens)
  return tmp, config, vocab, sequence.Layout.from_config(config)


def prepare(setup, codes=None, root=""):
  _, config, vocab, layout = setup
  return D.PrepareExample(vocab, layout, config.model.tokenizer, codes, root)


def test_json_and_jsonl_sources(tmp_path):
  items = [T.conversation("a/b.jpg", "What do you see?", "a cat"), {"id": "txt", **T.conversation(
      None, "Describe the image.", "a flower", marker=False)}]
  T.write_json(tmp_path / "c.json", items)
  (tmp_path / "c.jsonl").write_text(json.dumps(items[0]) + "\n\n{not json\n" + json.dumps(items[1]))
  listed = D.ConversationSource(tmp_path / "c.json", image_root="/root")
  lines = D.ConversationSource(tmp_path / "c.jsonl", image_root="/root")
  assert len(listed) == 2 and len(lines) == 3  # the blank line is not a record
  assert listed[0]["image"] == "/root/a/b.jpg" and listed[1]["image"] is None
  assert listed[1]["key"] == "txt" and lines[2]["key"] == "txt"
  assert lines[0]["conversations"] == items[0]["conversations"]
  assert lines[1]["skip"] == "bad_conversation"
  with pytest.raises(FileNotFoundError, match="conversation file not found"):
    D.ConversationSource(tmp_path / "missing.json")


def test_prepare_reads_images_like_the_tokenizer_clis(setup):
  photo = T.photos()["skimage/chelsea.png"]
  ex = prepare(setup).map({"key": "k", "image": photo, "conversations": T.conversation(
      photo, "What do you see?", "a cat")["conversations"]})
  np.testing.assert_array_equal(ex["image"], load_image(photo, 32))
  assert ex["has_image"] and ex["image_mask"].sum() == 16


def _bad_and_good_items(tmp):
  photos = list(T.photos().values())
  (tmp / "empty.png").write_bytes(b"")
  (tmp / "corrupt.jpg").write_bytes(b"\xff\xd8not a jpeg")
  long_answer = " ".join(["a cup of coffee"] * 20)
  return [
      T.conversation(photos[0], "What do you see?", "a"),
      T.conversation(str(tmp / "missing.jpg"), "What do you see?", "a cat"),
      T.conversation(str(tmp / "empty.png"), "What do you see?", "a cat"),
      T.conversation(str(tmp / "corrupt.jpg"), "What do you see?", "a cat"),
      {"image": photos[1], "conversations": [{"from": "gpt", "value": "first"}]},
      T.conversation(photos[2], "What do you see?", long_answer),
      T.conversation(None, "Describe the image.", "text only", marker=False),
      T.conversation(photos[3], "What do you see?", "b"),
  ]


def test_train_stream_skips_and_counts_bad_samples_and_resumes(setup):
  tmp = setup[0]
  source = D.ConversationSource(T.write_json(tmp / "mixed.json", _bad_and_good_items(tmp)))
  make = lambda: iter(D.make_train_dataset(source, prepare(setup), batch_size=3, seed=0,
                                           shard_index=0, shard_count=1))
  it = make()
  batches = [next(it) for _ in range(4)]  # 12 good samples: 4 epochs of 3 good ones
  assert batches[0]["tokens"].shape == (3, 64) and batches[0]["image"].shape == (3, 32, 32, 3)
  per_epoch = {"missing": 1, "empty": 1, "decode_error": 1, "bad_conversation": 1, "too_long": 1}
  totals = it.skipped_total
  for reason, n in per_epoch.items():
    assert totals[reason] == 4 * n, (reason, totals)
  assert sum(sum(b["skipped"].values()) for b in batches) == sum(totals.values())
  answers = {sequence_text(setup, b, i) for b in batches for i in range(3)}
  assert answers == {"a", "b", "text only"}
  # The iterator state (grain position + skip totals) resumes exactly.
  state = it.get_state()
  expected = next(it)
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))
  again = next(resumed)
  for k in ("tokens", "image", "loss_mask"):
    np.testing.assert_array_equal(again[k], expected[k])
  assert resumed.skipped_total == it.skipped_total


def sequence_text(setup, batch, i):
  vocab = setup[2]
  return vocab.decode(batch["tokens"][i][batch["loss_mask"][i]])


@pytest.mark.parametrize("fmt", ["npz", "array_record"])
def test_precomputed_codes_from_the_tokenize_cli(setup, fmt):
  tmp = setup[0] / fmt
  photos = list(T.photos().values())[:3]
  out = ["--output", str(tmp / "codes.npz")] if fmt == "npz" else [
      "--output_dir", str(tmp / "shards"), "--format", "array_record", "--shard_size", "2"]
  assert tokenize.main(["--checkpoint", T.tokenizer_dir(), *photos, *out]) == 0
  table = D.CodeTable(tmp / ("codes.npz" if fmt == "npz" else "shards"))
  assert len(table) == 3
  ref = {r["key"]: r for r in code_shards.read(tmp / ("codes.npz" if fmt == "npz" else "shards"))}
  item = {"key": "k", "image": photos[1], "conversations": T.conversation(
      photos[1], "What do you see?", "a cat")["conversations"]}
  ex = prepare(setup, table).map(item)
  np.testing.assert_array_equal(ex["codes_pixel"], ref[photos[1]]["pixel"])
  np.testing.assert_array_equal(ex["codes_semantic"], ref[photos[1]]["semantic"])
  assert "image" not in ex and ex["codes_pixel"].shape == (4, 4, 4)
  missing = prepare(setup, table).map({**item, "image": "/elsewhere/x.jpg"})
  assert missing["skip"] == "missing_codes"
  other = config_files.load("mllm_tiny").model.tokenizer
  other.vq_sem.codebook_size = 2  # codes from a bigger codebook do not fit this one
  _, _, vocab, lay = setup
  wrong = D.PrepareExample(vocab, lay, other, table).map(item)
  assert wrong["skip"] == "bad_codes" and "outside the codebooks" in wrong["error"]


def test_eval_set_is_padded_to_full_batches(setup):
  tmp = setup[0]
  items = T.photo_conversations([T.HELD_OUT_QUESTION])[:5]
  items.append(T.conversation(str(tmp / "missing.jpg"), "What do you see?", "x"))
  source = D.ConversationSource(T.write_json(tmp / "eval.json", items))
  batches, skipped = D.eval_batches(source, prepare(setup), batch_size=4, shard_index=0,
                                    shard_count=1)
  assert skipped["missing"] == 1 and len(batches) == 2
  rows = np.concatenate([b["loss_mask"].any(axis=1) for b in batches])
  np.testing.assert_array_equal(rows, [True] * 5 + [False] * 3)
  # Host 1 of 2 gets the other half, and the same number of batches.
  other, _ = D.eval_batches(source, prepare(setup), batch_size=4, shard_index=1, shard_count=2)
  assert len(other) == 1


# ---------------------------------------------------------------- caption -> image pairs
def _tar(path, members):
  import io, tarfile  # pylint: disable=g-import-not-at-top,multiple-imports
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def test_caption_sources_json_jsonl_and_tar_shards(setup, tmp_path):
  photos = list(T.photos().values())
  items = [{"image": photos[0], "caption": "a photo of an astronaut"},
           {"image": "rel.jpg", "text": "draw a cat"}, {"image": photos[1]}]
  T.write_json(tmp_path / "c.json", items)
  (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n{oops\n")
  listed = CD.CaptionSource(str(tmp_path / "c.json"), image_root="/root")
  lines = CD.CaptionSource(str(tmp_path / "c.jsonl"))
  assert len(listed) == 3 and len(lines) == 4
  assert listed[0] == {"key": "c.json/0", "image": photos[0], "caption": items[0]["caption"]}
  assert listed[1]["image"] == "/root/rel.jpg" and listed[1]["caption"] == "draw a cat"
  assert listed[2]["skip"] == "bad_caption" and lines[3]["skip"] == "bad_caption"
  with open(photos[2], "rb") as f:
    jpeg = f.read()
  shard = _tar(tmp_path / "s-0.tar", [("k1.jpg", jpeg), ("k1.txt", b"a rocket\n"),
                                      ("k2.jpg", jpeg)])
  tar = CD.CaptionSource(str(shard))
  assert tar[0]["caption"] == "a rocket" and tar[0]["image_bytes"] == jpeg
  assert tar[1]["skip"] == "bad_caption"  # no caption member
  ex = prepare(setup).map(tar[0])
  assert ex["has_image"] and ex["gen_mask"].sum() == 16 and ex["image"].shape == (32, 32, 3)
  np.testing.assert_array_equal(ex["image_mask"], ex["gen_mask"])


def test_mixed_stream_weights_and_caption_dropout(setup, tmp_path):
  photo = list(T.photos().values())[0]
  conversations = D.ConversationSource(T.write_json(tmp_path / "c.json", [
      T.conversation(photo, "What do you see?", "an astronaut")] * 4))
  captions = CD.CaptionSource(str(T.write_json(tmp_path / "p.json", [
      {"image": photo, "caption": f"caption {i}"} for i in range(4)])))
  stream = CD.mixed_stream([(conversations, 0.25), (captions, 0.75)], seed=0,
                           caption_dropout=0.5)
  records = [stream[i] for i in range(400)]
  generation = [r for r in records if "caption" in r]
  assert 0.65 < len(generation) / len(records) < 0.85
  dropped = sum(r["caption"] == "" for r in generation) / len(generation)
  assert 0.35 < dropped < 0.65
  again = CD.mixed_stream([(conversations, 0.25), (captions, 0.75)], seed=0, caption_dropout=0.5)
  assert [again[i] for i in range(50)] == records[:50]  # deterministic: resumable


def test_batches_mix_understanding_and_generation_rows(setup, tmp_path):
  photos = list(T.photos().values())
  conversations = D.ConversationSource(T.write_json(tmp_path / "c.json", [
      T.conversation(p, "What do you see?", "a thing") for p in photos[:4]]))
  captions = CD.CaptionSource(str(T.write_json(tmp_path / "p.json", [
      {"image": p, "caption": "a photo of a thing"} for p in photos[:4]])))
  it = iter(D.make_train_dataset([(conversations, 0.5), (captions, 0.5)], prepare(setup),
                                 batch_size=8, seed=1))
  batch = next(it)
  rows = batch["gen_mask"].any(axis=1)
  assert 0 < rows.sum() < 8 and batch["image_mask"][~rows].any()
  assert not (batch["loss_mask"] & batch["image_mask"]).any()
