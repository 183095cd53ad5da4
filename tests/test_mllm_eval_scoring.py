"""The benchmark scorers (`mllm_eval.scoring`) on hand-worked cases, awkward answers included."""

import pytest

from dualtoken_jax.mllm_eval import scoring


def test_pope_parsing_follows_llava():
  # First sentence only, commas dropped, "No"/"no"/"not" as a word -> no; anything else yes
  # (the script is case-sensitive: "Not sure" is a yes, and so is the empty answer).
  cases = {"No, there is not.": False, "yes.": True, "Not sure": True, "": True,
           "Yes, there is a dog. No doubt.": True, "There is no dog": False,
           "nothing": True, "It is not.": False, "Yes. No.": True}
  for text, yes in cases.items():
    assert scoring.pope_yes(text) is yes, text


def test_pope_metrics_hand_worked():
  preds = ["No, there is not.", "yes.", "Not sure", "", "Yes, there is a dog. No doubt.",
           "There is no dog"]
  labels = ["no", "yes", "no", "yes", "yes", "no"]
  # parsed: no yes yes yes yes no -> TP 3, FP 1, TN 2, FN 0
  m = scoring.pope(preds, labels)
  assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 2, 0)
  assert m["accuracy"] == pytest.approx(5 / 6)
  assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(1.0)
  assert m["f1"] == pytest.approx(2 * 0.75 / 1.75)
  assert m["yes_ratio"] == pytest.approx(4 / 6)
  none_yes = scoring.pope(["no"] * 2, ["yes", "no"])
  assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0
  with pytest.raises(ValueError, match="3 predictions for 2"):
    scoring.pope(["a", "b", "c"], ["yes", "no"])
  with pytest.raises(ValueError, match="'yes' or 'no'"):
    scoring.pope(["yes"], ["maybe"])


def test_mme_parsing_and_scores_hand_worked():
  assert [scoring.mme_label(t) for t in ("Yes", "no", "yes.", "No, there isn't", "Not sure",
                                         "", "I think not", "know", "Yes, but no")] == [
      "yes", "no", "yes", "no", "no", "other", "other", "no", "yes"]
  r = lambda task, image, pred, gold: dict(subtask=task, image=image, prediction=pred,
                                           answer=gold)
  records = [
      r("existence", "a.jpg", "Yes", "Yes"), r("existence", "a.jpg", "No, there isn't", "No"),
      r("existence", "b.jpg", "yes.", "Yes"), r("existence", "b.jpg", "I think not", "No"),
      r("count", "c.jpg", "", "Yes"), r("count", "c.jpg", "nope", "No"),
      r("commonsense_reasoning", "d.png", "Yes", "Yes"),
      r("commonsense_reasoning", "d.png", "no", "No")]
  m = scoring.mme(records)
  ex = m["subtasks"]["existence"]
  assert (ex["acc"], ex["acc_plus"], ex["score"]) == (75.0, 50.0, 125.0)
  assert ex["other"] == 1 and ex["images"] == 2 and ex["questions"] == 4
  assert m["subtasks"]["count"]["score"] == 50.0  # acc 50, acc+ 0
  assert m["perception"] == 175.0 and m["cognition"] == 200.0
  assert "OCR" in m["missing_subtasks"] and "count" not in m["missing_subtasks"]
  with pytest.raises(ValueError, match="Yes or No"):
    scoring.mme([r("count", "c.jpg", "yes", "3")])


def test_vqa_accuracy_hand_worked():
  assert scoring.vqa_accuracy("two", ["2"] * 10) == 1.0           # number word -> digit
  assert scoring.vqa_accuracy("Two.", ["2"] * 10) == 1.0
  # 2 of 10 humans said "2": leaving one of them out leaves 1 match (1/3), else 2 (2/3).
  assert scoring.vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
  assert scoring.vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # 3x2/3+7x1
  assert scoring.vqa_accuracy("the cat.", ["cat"] * 3 + ["a cat"] * 7) == 1.0     # articles
  assert scoring.vqa_accuracy("dont", ["don't"] * 10) == 1.0                     # contraction
  assert scoring.vqa_accuracy("cats", ["cat"] * 10) == 0.0
  assert scoring.vqa_accuracy("", ["yes"] * 10) == 0.0
  assert scoring.vqa_accuracy("1,000", ["1,000", "1000"] * 5) == 1.0  # digit comma: dropped
  assert scoring.vqa_normalize("Left-side, (mostly)!") == "left side mostly"
  m = scoring.vqa([dict(prediction="2", answers=["2"] * 10, answer_type="number"),
                   dict(prediction="no", answers=["yes"] * 10, answer_type="yes/no")])
  assert m["accuracy"] == 50.0 and m["answer_types"] == {"number": 100.0, "yes/no": 0.0}


def test_gqa_exact_match():
  assert scoring.gqa_match("Yes.", "yes") and scoring.gqa_match(" left ", "left")
  assert not scoring.gqa_match("left side", "left") and not scoring.gqa_match("a cat", "cat")
  m = scoring.gqa([dict(prediction="Table.", answer="table", question_type="x"),
                   dict(prediction="chair", answer="table", question_type="y")])
  assert m["accuracy"] == 50.0 and m["question_types"] == {"x": 100.0, "y": 0.0}


OPTIONS_1 = dict(A="a cat", B="a dog", C="a bird", D="a fish")
OPTIONS_2 = dict(A="a dog", B="a bird", C="a fish", D="a cat")   # the same, rotated


def test_match_option_letters_and_texts():
  assert scoring.match_option("B) a dog", OPTIONS_1) == "B"
  assert scoring.match_option("(C)", OPTIONS_1) == "C"
  assert scoring.match_option("D.", OPTIONS_1) == "D"
  assert scoring.match_option("The answer is A", OPTIONS_1) == "A"
  assert scoring.match_option("a dog", OPTIONS_1) == "B"          # by option text
  assert scoring.match_option("It is a fish, I think", OPTIONS_1) == "D"
  assert scoring.match_option("A or B", OPTIONS_1) is None        # two letters
  assert scoring.match_option("I don't know", OPTIONS_1) is None
  assert scoring.match_option("", OPTIONS_1) is None
  assert scoring.match_option("a dog", dict(A="dog", B="a dog")) == "B"  # contained: longest
  assert scoring.options_of(dict(A="x", B=float("nan"), C="", D="nan")) == {"A": "x"}


def test_mmbench_circular_needs_every_rotation():
  records = [dict(index=0, prediction="B) a dog", answer="B", category="animals", **OPTIONS_1),
             dict(index=0, prediction="a dog", answer="A", category="animals", **OPTIONS_2),
             dict(index=1, prediction="C", answer="C", category="birds", **OPTIONS_1),
             dict(index=1, prediction="I don't know", answer="B", category="birds",
                  **OPTIONS_2)]
  m = scoring.mmbench_circular(records)
  assert m["accuracy"] == 50.0 and m["vanilla_accuracy"] == 75.0
  assert m["unmatched_rate"] == 25.0 and m["questions"] == 2 and m["answers"] == 4
  assert m["categories"] == {"animals": 100.0, "birds": 0.0}
  wrong_rotation = [dict(records[0]), dict(records[1], prediction="D")]
  assert scoring.mmbench_circular(wrong_rotation)["accuracy"] == 0.0


def test_seed_accuracy_per_question_type():
  records = [dict(prediction="A", answer="A", question_type=1, **OPTIONS_1),
             dict(prediction="a bird", answer="C", question_type=1, **OPTIONS_1),
             dict(prediction="(B)", answer="D", question_type=2, **OPTIONS_1),
             dict(prediction="no idea", answer="A", question_type=2, **OPTIONS_1)]
  m = scoring.seed(records)
  assert m["accuracy"] == 50.0 and m["count"] == 4
  assert m["question_types"] == {"1": 100.0, "2": 0.0} and m["unmatched_rate"] == 25.0
