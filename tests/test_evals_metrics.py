"""Golden values for every evaluation metric, computed by hand from the published definitions
(the official scorers' adversarial cases are in test_evals_official.py)."""

from __future__ import annotations

import pytest

from vlm_prune.evals import metrics, parsers
from vlm_prune.evals.normalize import normalize_vqa


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("ten", "10"), ("none", "0"),          # number words -> digits
    ("a dog.", "dog"), ("The Dog", "dog"), ("an apple", "apple"),  # articles, final period
    ("isnt", "isn't"), ("isn't", "isn't"), ("dont", "don't"),      # contractions
    ("3.5", "3.5"), ("3.5.", "3.5"),                      # a period before a digit stays
    ("black-and-white", "black and white"),               # punctuation inside a word -> space
    ("yes !", "yes"), ("Yes!", "yes"), ("left, right", "left right"),
    ("1,000", "1000"),                                    # digit,digit: marks deleted
    ("  red\n", "red"), ("12:30", "12:30"),               # colon kept
])
def test_vqa_normalisation(raw, expected):
    assert normalize_vqa(raw) == expected


def test_vqa_normalisation_is_what_matching_uses():
    assert normalize_vqa("Two") == normalize_vqa("2")
    assert normalize_vqa("a dog.") == normalize_vqa("dog")
    assert normalize_vqa("isnt") == normalize_vqa("isn't")
    assert normalize_vqa("3.5") != normalize_vqa("35")


@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    (1, 0.3),   # 9 subsets hold the match once (1/3), the one without it 0: 9 * (1/3) / 10
    (2, 0.6),   # 2 subsets hold 1 match (1/3), 8 hold 2 (2/3): (2/3 + 16/3) / 10
    (3, 0.9),   # 3 subsets hold 2 (2/3), 7 hold 3 (1): (2 + 7) / 10
    (4, 1.0),   # every subset holds >= 3
    (10, 1.0),
])
def test_vqa_leave_one_out_accuracy(matches, expected):
    answers = ["dog"] * matches + ["cat", "cow", "pig", "hen", "fox", "owl", "bee", "elk", "emu", "ant"][: 10 - matches]
    assert metrics.vqav2_accuracy("dog", answers) == pytest.approx(expected)
    assert metrics.textvqa_accuracy("dog", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides_when_humans_disagree():
    answers = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]
    assert metrics.vqav2_accuracy("Two.", answers) == pytest.approx(0.9)
    records = [{"prediction": "Two", "target": answers}, {"prediction": "3", "target": answers},
               {"prediction": "x", "target": None}]  # unlabelled: not scored
    assert metrics.vqav2_metric(records) == {"accuracy": pytest.approx(95.0), "n": 2}
    assert metrics.textvqa_metric(records) == {"accuracy": pytest.approx(95.0), "n": 2}


def test_gqa_exact_match():
    assert metrics.gqa_correct("Yes.", "yes")
    assert metrics.gqa_correct(" left ", "left")
    assert not metrics.gqa_correct("the left", "left")  # no VQA normalisation on GQA
    out = metrics.gqa_metric([{"prediction": "Table", "target": "table"}, {"prediction": "chair", "target": "desk"}])
    assert out == {"accuracy": 50.0, "n": 2}


@pytest.mark.parametrize("text, label", [
    ("Yes", "yes"), ("yes, there is a dog.", "yes"), ("No", "no"), ("No, there is not.", "no"),
    ("There is no dog in the image.", "no"), ("It is not there", "no"), ("Yes. No other dogs.", "yes"),
])
def test_pope_reading(text, label):
    assert parsers.pope_answer(text) == label
    assert parsers.lenient_yes_no(text) == label


def test_pope_confusion_and_scores():
    pairs = [("yes", "yes"), ("yes", "no"), ("no", "no"), ("no", "yes"), ("yes", "yes")]
    c = metrics.pope_counts(pairs)
    assert c == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    s = metrics.pope_scores(c)
    assert s["accuracy"] == pytest.approx(60.0)
    assert s["precision"] == pytest.approx(200 / 3)
    assert s["recall"] == pytest.approx(200 / 3)
    assert s["f1"] == pytest.approx(200 / 3)
    assert s["yes_ratio"] == pytest.approx(60.0)


def test_pope_metric_per_split_and_mean():
    rec = lambda p, t, split: {"prediction": p, "target": t, "meta": {"split": split}}
    records = [rec("yes", "yes", "random"), rec("no", "no", "random"),            # random: all right
               rec("yes", "no", "adversarial"), rec("yes", "yes", "adversarial")]  # adversarial: 1 fp
    out = metrics.pope_metric(records)
    assert out["random/accuracy"] == 100.0 and out["random/f1"] == 100.0
    assert out["adversarial/accuracy"] == 50.0 and out["adversarial/precision"] == 50.0
    assert out["adversarial/recall"] == 100.0 and out["adversarial/yes_ratio"] == 100.0
    assert out["adversarial/f1"] == pytest.approx(200 / 3)
    assert out["accuracy"] == 75.0 and out["f1"] == pytest.approx((100 + 200 / 3) / 2) and out["n"] == 4


@pytest.mark.parametrize("text, label", [("Yes", "yes"), ("yes.", "yes"), ("No, it is not", "no"),
                                         ("Maybe", "other"), ("It is yes", "other")])
def test_mme_reading(text, label):
    assert parsers.mme_answer(text) == label
    assert parsers.lenient_mme(text) == label


def test_mme_acc_plus_and_sums():
    def rec(pred, target, sub, image):
        return {"prediction": pred, "target": target, "meta": {"category": sub}, "group": f"{sub}/{image}"}

    records = [
        rec("Yes", "yes", "existence", "a.jpg"), rec("No", "no", "existence", "a.jpg"),  # image a: both right
        rec("Yes", "yes", "existence", "b.jpg"), rec("Yes", "no", "existence", "b.jpg"),  # image b: one wrong
        rec("Yes", "yes", "count", "c.jpg"), rec("No", "no", "count", "c.jpg"),
        rec("Maybe", "yes", "code_reasoning", "d.png"), rec("No", "no", "code_reasoning", "d.png"),
    ]
    out = metrics.mme_metric(records)
    assert out["existence/acc"] == 75.0 and out["existence/acc_plus"] == 50.0 and out["existence/score"] == 125.0
    assert out["count/score"] == 200.0
    assert out["code_reasoning/acc"] == 50.0 and out["code_reasoning/acc_plus"] == 0.0
    assert out["perception"] == 325.0 and out["cognition"] == 50.0 and out["total"] == 375.0
    assert out["unparsed"] == 1  # "Maybe"


OPTIONS = {"A": "red", "B": "green", "C": "blue"}


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("C. blue", "C"), ("The answer is A.", "A"),
    ("blue", "C"), ("Green.", "B"), ("D", None), ("purple", None), ("", None),
])
def test_lenient_option_letter(text, letter):
    """--lenient-parsing's reader (not official: see test_evals_official.py for those)."""
    assert parsers.lenient_letter(text, OPTIONS) == letter


def test_mc_accuracy():
    def rec(p, t):
        return {"id": p + t, "prediction": p, "target": t, "meta": {"options": OPTIONS}, "group": p + t}

    records = [rec("A", "A"), rec("(B)", "B"), rec("C", "A"), rec("nonsense", "C")]
    # LLaVA's ScienceQA reader does not read "(B)": 1 of 4 right, 2 unparsed
    assert metrics.sqa_metric(records) == {"accuracy": 25.0, "n": 4, "unparsed": 2}
    # VLMEvalKit's matching reads "(B)" (brackets are separators): no circular groups, no circular score
    assert metrics.mmbench_metric(records) == {"accuracy": 50.0, "n": 4, "unparsed": 1}
    assert metrics.sqa_metric(records, lenient=True) == {"accuracy": 50.0, "n": 4, "unparsed": 1}


def test_mmbench_circular():
    def rec(p, t, group, rot):
        return {"id": f"{group}@{rot}", "prediction": p, "target": t, "group": group,
                "meta": {"options": OPTIONS, "rotation": rot}}

    records = [rec("A", "A", "1", 0), rec("C", "C", "1", 1), rec("B", "B", "1", 2),  # q1: every pass right
               rec("B", "B", "2", 0), rec("B", "A", "2", 1), rec("C", "C", "2", 2)]  # q2: rotation 1 wrong
    out = metrics.mmbench_metric(records)
    assert out["accuracy"] == 100.0 and out["n"] == 2  # the unrotated passes
    assert out["circular_accuracy"] == 50.0 and out["n_circular"] == 2
