"""The benchmark readers on small files written in each benchmark's real layout, the prompts
LLaVA's evaluation writes, and the runner's predictions file (torn lines after a kill)."""

import base64
import csv
import json
import shutil

import pytest

from dualtoken_jax.mllm import demo
from dualtoken_jax.mllm_eval import runner, tasks

PHOTO = next(iter(demo.photos().values()))


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_prompts_as_llava_writes_them():
  assert tasks.short_prompt("Is there a dog?", "llava") == (
      "Is there a dog?\nAnswer the question using a single word or phrase.")
  assert tasks.short_prompt("Is there a dog?\nAnswer the question using a single word or "
                            "phrase.", "plain") == "Is there a dog?"
  options = {"A": "a cat", "B": "a dog"}
  assert tasks.choice_prompt("What is it?", options, "llava", hint="Look.") == (
      "Look.\nWhat is it?\nA. a cat\nB. a dog\n"
      "Answer with the option's letter from the given choices directly.")
  assert tasks.choice_prompt("What is it?", options, "plain") == "What is it?\nA. a cat\nB. a dog"


def test_pope_llava_questions_with_coco_labels(tmp_path):
  (tmp_path / "val2014").mkdir()
  shutil.copy(PHOTO, tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
  (tmp_path / "coco").mkdir()
  suffix = "\nAnswer the question using a single word or phrase."
  questions, n = [], 0
  for split in tasks.POPE_SPLITS:
    labels = [{"question_id": 1, "image": "COCO_val2014_000000000001.jpg",
               "text": "Is there a cat in the image?", "label": "yes"},
              {"question_id": 2, "image": "COCO_val2014_000000000001.jpg",
               "text": "Is there a dog in the image?", "label": "no"}]
    if split == "random":
      labels.append({"question_id": 3, "image": "missing.jpg", "text": "Is there x?",
                     "label": "no"})
    _jsonl(tmp_path / "coco" / f"coco_pope_{split}.json", labels)
    for l in labels:
      n += 1
      questions.append({"question_id": n, "image": l["image"], "text": l["text"] + suffix,
                        "category": split})
  _jsonl(tmp_path / "llava_pope_test.jsonl", questions)
  data = tasks.read_pope(tmp_path, None, "llava")
  assert len(data.items) == 6 and data.skipped["missing"] == 1
  first = data.items[0]
  assert first.qid == "1" and first.prompt == "Is there a cat in the image?" + suffix
  assert first.meta == {"split": "adversarial", "label": "yes"}
  plain = tasks.read_pope(tmp_path, None, "plain").items[1]
  assert plain.prompt == "Is there a dog in the image?" and plain.meta["label"] == "no"
  (tmp_path / "llava_pope_test.jsonl").unlink()  # the label files alone (POPE's own layout)
  alone = tasks.read_pope(tmp_path, None, "plain")
  assert [it.qid for it in alone.items[:2]] == ["adversarial/1", "adversarial/2"]
  rows = [dict(it.meta, prediction="Yes" if it.meta["label"] == "yes" else "No, it is not.")
          for it in alone.items]
  scores = tasks.score_pope(rows)
  assert scores["f1"] == 1.0 and scores["random"]["count"] == 2


def test_pope_mismatched_files_fail_clearly(tmp_path):
  _jsonl(tmp_path / "coco_pope_random.json", [{"question_id": 1, "image": "a.jpg",
                                               "text": "Is there a cat?", "label": "yes"}])
  _jsonl(tmp_path / "llava_pope_test.jsonl", [{"question_id": 1, "image": "a.jpg",
                                               "text": "Is there a dog?", "category": "random"}])
  with pytest.raises(ValueError, match="does not match"):
    tasks.read_pope(tmp_path, tmp_path, "llava")
  with pytest.raises(FileNotFoundError, match="coco_pope"):
    tasks.read_pope(tmp_path / "nothing", None, "llava")


def test_mme_both_folder_layouts(tmp_path):
  root = tmp_path / "MME_Benchmark_release_version"
  (root / "existence").mkdir(parents=True)      # images beside their question files
  shutil.copy(PHOTO, root / "existence" / "0001.png")
  (root / "existence" / "0001.txt").write_text(
      "Is there a cat in this image? Please answer yes or no.\tYes\n"
      "Is there a dog in this image? Please answer yes or no.\tNo\n")
  (root / "existence" / "0002.txt").write_text("Is there x?\tYes\n")  # no image: skipped
  art = root / "artwork"                         # images/ + questions_answers_YN/
  (art / "images").mkdir(parents=True)
  (art / "questions_answers_YN").mkdir()
  shutil.copy(PHOTO, art / "images" / "10002.jpg")
  (art / "questions_answers_YN" / "10002.txt").write_text(
      "Is this artwork by Monet? Please answer yes or no.\tNo\nbroken line\n")
  data = tasks.read_mme(root, None, "llava")
  assert [it.qid for it in data.items] == ["artwork/10002/0", "existence/0001/0",
                                           "existence/0001/1"]
  assert data.skipped["missing"] == 1 and data.skipped["bad_record"] == 1
  assert data.items[1].prompt.endswith("Please answer yes or no.\n" + tasks.SHORT_ANSWER)
  assert data.items[1].meta == {"subtask": "existence", "image": "existence/0001",
                                "answer": "Yes"}
  rows = [dict(it.meta, prediction=it.meta["answer"]) for it in data.items]
  scores = tasks.TASKS["mme"].score(rows)
  assert scores["perception"] == 400.0  # both subtasks all right: 100 + 100 each

def test_mmbench_tsv_rotations_and_circular_copies(tmp_path):
  image = base64.b64encode(open(PHOTO, "rb").read()).decode()
  def write(rows):
    path = tmp_path / "mmbench_dev.tsv"
    with path.open("w", newline="") as f:
      w = csv.DictWriter(f, ["index", "question", "hint", "A", "B", "C", "D", "answer",
                             "category", "image"], delimiter="\t")
      w.writeheader()
      w.writerows(rows)
    return path
  row = dict(index=7, question="What is shown?", hint="nan", A="a cat", B="a dog", C="a bird",
             D="a fish", answer="B", category="animals", image=image)
  bad = dict(row, index=8, answer="E")
  data = tasks.read_mmbench(write([row, bad]), None, "llava")
  assert data.skipped["bad_record"] == 1 and len(data.items) == 4  # rotated by the reader
  assert [it.meta["answer"] for it in data.items] == ["B", "A", "D", "C"]
  assert [it.meta[it.meta["answer"]] for it in data.items] == ["a dog"] * 4
  assert data.items[1].prompt.startswith("What is shown?\nA. a dog\nB. a bird")
  assert data.items[0].image[:4] == open(PHOTO, "rb").read()[:4]
  rotated = dict(row, index=1_000_007, A="a dog", B="a bird", C="a fish", D="a cat", answer="A")
  copies = tasks.read_mmbench(write([row, rotated]), None, "plain")
  assert [it.meta["index"] for it in copies.items] == [7, 7] and len(copies.items) == 2
  rows = [dict(it.meta, prediction=it.meta[it.meta["answer"]]) for it in copies.items]
  assert tasks.TASKS["mmbench"].score(rows)["accuracy"] == 100.0


def test_seed_gqa_vqav2_textvqa_layouts(tmp_path):
  (tmp_path / "SEED-Bench-image").mkdir()
  shutil.copy(PHOTO, tmp_path / "SEED-Bench-image" / "1454426_2591111986.jpg")
  q = dict(answer="B", choice_a="a dog", choice_b="a cat", choice_c="a car", choice_d="a cup",
           data_id="1454426_2591111986.jpg", data_type="image", question="What is it?",
           question_id="101669", question_type_id=1)
  video = dict(q, data_type="video", question_id="9")
  (tmp_path / "SEED-Bench.json").write_text(json.dumps(
      {"questions": [q, video, dict(q, question_id="5", answer="Z")],
       "question_type": {"Scene Understanding": 1}}))
  seed = tasks.read_seed(tmp_path / "SEED-Bench.json", None, "llava")
  assert len(seed.items) == 1 and seed.skipped["bad_record"] == 1
  item = seed.items[0]
  assert item.choices == ("a dog", "a cat", "a car", "a cup") and item.question == "What is it?"
  assert item.meta["question_type"] == "Scene Understanding"
  assert item.prompt.endswith("D. a cup\n" + tasks.MULTIPLE_CHOICE)

  (tmp_path / "images").mkdir()
  shutil.copy(PHOTO, tmp_path / "images" / "n161313.jpg")
  (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(
      {"201307251": {"imageId": "n161313", "question": "Is it a cat?", "answer": "yes",
                     "types": {"structural": "verify"}},
       "2": {"imageId": "n161313", "question": "Broken"}}))
  gqa = tasks.read_gqa(tmp_path / "testdev_balanced_questions.json", None, "llava")
  assert [it.qid for it in gqa.items] == ["201307251"] and gqa.skipped["bad_record"] == 1
  assert gqa.items[0].meta == {"answer": "yes", "question_type": "verify"}

  (tmp_path / "val2014").mkdir()
  shutil.copy(PHOTO, tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
  (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(
      {"data_subtype": "val2014", "questions": [
          {"image_id": 42, "question": "How many?", "question_id": 420}]}))
  (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(
      {"annotations": [{"question_id": 420, "answer_type": "number", "image_id": 42,
                        "answers": [{"answer": "2", "answer_id": i} for i in range(10)]}]}))
  vqa = tasks.read_vqav2(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", None, "llava")
  assert vqa.items[0].meta == {"answers": ["2"] * 10, "answer_type": "number"}
  assert tasks.TASKS["vqav2"].score([dict(vqa.items[0].meta, prediction="Two")])[
      "accuracy"] == 100.0

  (tmp_path / "train_images").mkdir()
  shutil.copy(PHOTO, tmp_path / "train_images" / "abc.jpg")
  (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
      {"question_id": 34602, "question": "What brand?", "image_id": "abc",
       "answers": ["nous"] * 10}]}))
  text = tasks.read_textvqa(tmp_path / "TextVQA_0.5.1_val.json", None, "plain")
  assert text.items[0].prompt == "What brand?" and text.items[0].meta["answers"][0] == "nous"


def test_predictions_file_drops_a_torn_last_line(tmp_path):
  path = tmp_path / "predictions.jsonl"
  path.write_text('{"qid": "a", "prediction": "yes"}\n{"qid": "b", "predic')
  assert list(runner.read_predictions(path)) == ["a"]
  assert path.read_text() == '{"qid": "a", "prediction": "yes"}\n'  # cut, ready to append
  path.write_text('{"qid": "a"}\nnot json\n{"qid": "b"}\n')
  with pytest.raises(ValueError, match="not JSON"):
    runner.read_predictions(path)
  assert runner.read_predictions(tmp_path / "none.jsonl") == {}


def test_unknown_task_and_mode_fail_clearly(tmp_path):
  with pytest.raises(ValueError, match="unknown task"):
    tasks.get("nope")
  with pytest.raises(ValueError, match="ranks options"):
    runner.evaluate(None, "pope", tmp_path, tmp_path, mode="loglikelihood")
