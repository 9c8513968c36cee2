"""The official scorers' rules on adversarial answers (each expected value worked out by hand from
the rule written next to it; sources in evals/parsers.py, normalize.py and evals/README.md), the
MMBench headline, the stale-data guard, bad data without tracebacks, and the folder layouts users
have."""

from __future__ import annotations

import json

import pytest

from vlm_prune.evals import backends as backends_mod
from vlm_prune.evals import metrics, parsers
from vlm_prune.evals.cli import main
from vlm_prune.evals.configs import make_config
from vlm_prune.evals.data import DataError
from vlm_prune.evals.normalize import evalai_answer, normalize_vqa
from vlm_prune.evals.runner import run_benchmark
from vlm_prune.evals.tasks import get_task, load_bench, load_items

from .test_evals_runner import Scripted
from .test_evals_samples import _dump, mmbench_rows, write_all, write_mmbench, write_pope, write_textvqa, write_vqav2

# ------------------------------------------------------------------------------------ POPE
# Rule (RUCAIBox/POPE evaluate.py = LLaVA eval_pope.py): strip (LLaVA's runner), keep the text
# before the first ".", delete ",", split on " " only; "no" iff a word is exactly No / no / not.


@pytest.mark.parametrize("text, official, lenient", [
    ("Yes", "yes", "yes"),
    ("no", "no", "no"),
    ("No, there is not.", "no", "no"),     # "No there is not": the word "No"
    ("NO", "yes", "no"),                   # upper case is none of No / no / not
    ("Not at all.", "yes", "no"),          # "Not" is not "not"
    ("  yes", "yes", "yes"),               # stripped first
    ("...no", "yes", "yes"),               # the first sentence is empty
    ("No!", "yes", "yes"),                 # "No!" is not the word "No"; lenient: no "." split either
    ("no,there is one", "yes", "no"),      # comma deleted: "nothere"
    ("No\nthere is none", "yes", "no"),    # split on spaces only: "No\nthere" is one word
    ("There is no dog.", "no", "no"),
    ("Yes. No other dogs.", "yes", "yes"),  # only the first sentence counts
])
def test_pope_official_reading(text, official, lenient):
    assert parsers.pope_answer(text) == official
    assert parsers.lenient_yes_no(text) == lenient


def test_pope_metric_uses_the_official_reading():
    records = [{"prediction": p, "target": t, "meta": {"split": "random"}}
               for p, t in [("NO", "no"), ("No", "no"), ("Yes", "yes"), ("Not at all.", "no")]]
    out = metrics.pope_metric(records)  # "NO" and "Not at all." read as yes: 2 false positives
    assert out["random/accuracy"] == 50.0 and out["random/precision"] == pytest.approx(100 / 3)
    assert out["random/yes_ratio"] == 75.0
    assert metrics.pope_metric(records, lenient=True)["random/accuracy"] == 100.0


# ------------------------------------------------------------------------------------- MME
# Rule (MME eval_tool/calculation.py): lower case; "yes"/"no" as is; else "yes" if the first 4
# characters contain "yes", else "no" if they contain "no", else "other" (always wrong).


@pytest.mark.parametrize("text, official, lenient", [
    ("NO", "no", "no"),
    (" yes", "yes", "yes"),
    ("Yes.", "yes", "yes"),                # "yes." holds "yes"
    ("yes, there is", "yes", "yes"),
    ("Not sure", "no", "no"),              # "not " holds "no"
    ("None", "no", "no"),
    ("It is yes", "other", "other"),       # "it i"
    ("The answer is no", "other", "other"),
    ("y", "other", "yes"),                 # lmms-eval (lenient) reads a lone y / n
    ("n.", "other", "no"),                 # lmms-eval drops periods first
])
def test_mme_official_reading(text, official, lenient):
    assert parsers.mme_answer(text) == official
    assert parsers.lenient_mme(text) == lenient


# ------------------------------------------------------------------------------------- VQA
# LLaVA's answer processor (m4c_evaluator.py EvalAIAnswerProcessor): lower, delete "," and "?",
# "'s" -> " 's", then punctuation / periods / numbers / articles / contractions (normalize.py).


@pytest.mark.parametrize("raw, processed", [
    ("Two", "2"), ("ten", "10"), ("none", "0"),   # number words
    ("The dog.", "dog"), ("an apple", "apple"),   # articles, a period not before a digit
    ("3.5", "3.5"), ("3.5.", "3.5"),
    ("1,000", "1000"), ("What?", "what"),         # "," and "?" deleted in step 1
    ("dog's", "dog 's"),                          # the possessive split off
    ("black-and-white", "black and white"),       # a mark inside a word becomes a space
    ("yes !", "yes"),                             # a mark next to a space is deleted
    ("isnt", "isn't"), ("couldnt've", "couldn't've"),
    ("couldntve", "couldntve"), ("im", "im"), ("lets", "lets"), ("wed", "wed"),  # not in the table
    ("12:30", "12:30"),                           # the colon is no punctuation here
    ("." * 40, "." * 8),                          # at most 32 periods go (re.UNICODE passed as the count)
])
def test_evalai_answer_processor(raw, processed):
    assert evalai_answer(raw) == processed


@pytest.mark.parametrize("raw, processed", [
    ("dog's", "dog's"),           # GT-Vision-Lab's normalisation has no possessive split
    ("left, right", "left right"), ("Yes!", "yes"), ("1,000", "1000"), ("What?", "what"),
    ("." * 40, "." * 8),
])
def test_vqa_eval_normalisation(raw, processed):
    assert normalize_vqa(raw) == processed


def test_vqav2_official_pipeline_quirks():
    # GT-Vision-Lab's vqaEval.py normalises humans and prediction only when the humans disagree
    assert metrics.vqa_eval_accuracy("two", ["2"] * 10) == 0.0
    assert metrics.vqa_eval_accuracy("two", ["2"] * 9 + ["3"]) == 1.0  # 9 matches in every subset
    assert metrics.vqa_eval_accuracy("Dog", ["dog"] * 10) == 0.0        # not even lower-cased
    # LLaVA's processor runs on the prediction first: "Two." -> "2", "A dog" -> "dog"
    assert metrics.vqav2_accuracy("Two.", ["2"] * 10) == 1.0
    assert metrics.vqav2_accuracy("A dog", ["dog"] * 10) == 1.0
    # ... and makes "ten" "10", which agreeing humans' raw "ten" never equals
    assert metrics.vqav2_accuracy("ten", ["ten"] * 10) == 0.0
    assert metrics.vqav2_accuracy("ten", ["ten"] * 9 + ["9"]) == 1.0    # disagreeing: normalised too
    # ... and splits the possessive, which the humans' answers keep: never a match
    assert metrics.vqav2_accuracy("dog's", ["dog's"] * 10) == 0.0
    assert metrics.vqav2_accuracy("dog's", ["dog's"] * 9 + ["cat"]) == 0.0
    # TextVQA (m4c TextVQAAccuracyEvaluator): the processor on both sides, always
    assert metrics.textvqa_accuracy("ten", ["ten"] * 10) == 1.0
    assert metrics.textvqa_accuracy("dog's", ["dog's"] * 10) == 1.0
    # --lenient-parsing: both sides normalised always
    assert metrics.lenient_vqa_accuracy("ten", ["ten"] * 10) == 1.0


# --------------------------------------------------------------------------------------- GQA
# Rule (LLaVA convert_gqa_for_eval.py, then GQA's eval.py): final periods removed, lower case,
# then equal to the answer.


@pytest.mark.parametrize("text, official, lenient", [
    ("Yes.", True, True), ("left..", True, True),
    ("yes .", False, True),                     # the space before the period stays
    ("the left", False, False),                 # no VQA normalisation on GQA
])
def test_gqa_official_reading(text, official, lenient):
    answer = "left" if "left" in text else "yes"
    assert metrics.gqa_correct(text, answer) is official
    assert metrics.gqa_correct(text, answer, lenient=True) is lenient


# --------------------------------------------------------------------------------- ScienceQA
# Rule (LLaVA eval_science_qa.py): the answer is one of A..E; or starts with a letter of A..E
# and ". "; or "The answer is X" + any one character occurs exactly once; the letter must be one
# of the first len(choices) of A..E. Anything else is FAILED (wrong).

SQA = {"A": "two", "B": "three", "C": "four"}


@pytest.mark.parametrize("text, official, lenient", [
    ("B", "B", "B"),
    (" B ", "B", "B"),                            # stripped first (LLaVA's runner)
    ("B. three", "B", "B"),                       # letter + ". "
    ("The answer is B.", "B", "B"),
    ("(B)", None, "B"),                           # no rule reads brackets
    ("B.", None, "B"),                            # ". " needs the space (and 3 characters)
    ("b", None, None),                            # lower case is no option letter
    ("three", None, "B"),                         # an option's text is not read
    ("The answer is B", None, "B"),               # nothing after the letter for the "."
    ("the answer is B.", None, "B"),              # case-sensitive
    ("The answer is B. The answer is C.", None, "B"),  # two matches: FAILED
    ("E", None, None),                            # beyond the 3 choices
    ("The answer is D.", None, None),
])
def test_scienceqa_official_reading(text, official, lenient):
    assert parsers.sqa_letter(text, SQA) == official
    assert parsers.lenient_letter(text, SQA) == lenient


# ----------------------------------------------------------------------------------- MMBench
# Rule (VLMEvalKit matching_util.py can_infer): refusal phrases -> wrong; separators
# .()[],:;!*#{} to spaces; exactly one option letter among the words and among the last four ->
# it; no letter but "Z" -> wrong; else "answer is X" (any case); else the one option whose text
# occurs in the answer, if the answer is at most twice the options' total length.

MMB = {"A": "square", "B": "circle", "C": "triangle", "D": "star"}


@pytest.mark.parametrize("text, official", [
    ("It is circle.", "B"),                       # no letter: the option text "circle"
    ("A circle one is in the picture.", "B"),     # "A" is word 1 of 7, not among the last 4: text
    ("B", "B"),
    ("The answer is B", "B"),                     # "B" is the last of 4 words
    ("(B)", "B"), ("B. circle", "B"), ("**B**", "B"),
    ("I think the answer is B because the shape is round", "B"),  # too early, but "answer is B"
    ("the answer is a circle", "A"),              # "answer is a" matches case-blind: A (!)
    ("A or B", None),                             # two letters, no option text
    ("Z", None),                                  # no letter, "Z": refused
    ("Cannot determine the answer, maybe circle", None),  # refusal phrase: no text matching
    ("It is a star or a square", None),           # two option texts
    ("circle " * 10, None),                       # longer than twice the options' 24 characters
    ("b", None),                                  # letters are case-sensitive words
])
def test_mmbench_official_matching(text, official):
    assert parsers.mmbench_letter(text, MMB) == official


def test_mmbench_lenient_reading_differs():
    assert parsers.lenient_letter("A circle one is in the picture.", MMB) == "A"
    assert parsers.lenient_letter("It is circle.", MMB) is None


# ---------------------------------------------------------------------------- MMBench headline


def _mmbench_summary(tmp_path, rows, circular, answer="B"):
    write_mmbench(tmp_path / "data" / "mmbench", rows)
    task = get_task("mmbench")
    bench = load_bench(task, tmp_path / "data", {"mmbench_circular": circular})
    return run_benchmark(Scripted(answer=answer), task, make_config("none", 1.0), bench.items, tmp_path / "out",
                         progress=False, data_fingerprint=bench.fingerprint)


def test_mmbench_headline_is_circular_accuracy_when_rotations_exist(tmp_path):
    plain = _mmbench_summary(tmp_path / "a", None, circular=False)
    assert plain["primary"] == "accuracy" and "circular_accuracy" not in plain["metrics"]
    circ = _mmbench_summary(tmp_path / "b", None, circular=True)
    # "B" is right for question 0 (answer B) in rotation 0 only: circular 0 of 3
    assert circ["primary"] == "circular_accuracy" and circ["score"] == 0.0
    assert circ["metrics"]["accuracy"] == pytest.approx(100 / 3)
    # a TSV that ships the rotated copies (index + k * 1,000,000), without --mmbench-circular
    rows = mmbench_rows()[:1]
    rot = list(rows[0])
    rot[0], rot[3:7], rot[7] = "1000000", ["a dog", "a cow", "a pig", "a cat"], "A"
    shipped = _mmbench_summary(tmp_path / "c", rows + [rot], circular=False)
    assert shipped["primary"] == "circular_accuracy" and shipped["score"] == 0.0  # "B" wrong in the copy
    assert shipped["metrics"]["accuracy"] == 100.0


def test_retention_pairs_only_same_headline(tmp_path):
    from vlm_prune.evals.report import add_retention

    base = {"method": "none", "bench": "mmbench", "setup": {"model": "m"}, "primary": "accuracy", "score": 50.0,
            "efficiency": {"prefill_gflops": 1.0}}
    other = {**base, "method": "pool", "primary": "circular_accuracy", "score": 40.0}
    add_retention([base, other])
    assert other["retention"] is None  # a plain baseline is no reference for a circular score


# ------------------------------------------------------------------------------- stale data


def _run(data, out, bench, *extra):
    return main(["--model", "unused", "--method", "none", "--bench", bench, "--data", str(data),
                 "--out", str(out), "--no-progress", *extra])


@pytest.fixture
def pope_cli(monkeypatch):
    """main() on POPE with a backend that always answers "yes"."""
    monkeypatch.setattr(backends_mod, "make_backend", lambda *a, **k: Scripted(answer="yes"))
    return lambda data, out, *extra: _run(data, out, "pope", *extra)


def test_changed_data_is_refused_not_rescored(tmp_path, pope_cli, capsys):
    data, out = write_all(tmp_path / "data"), tmp_path / "out"
    assert pope_cli(data, out) == 0
    setup = json.loads((out / "none" / "pope" / "setup.json").read_text())
    assert set(setup["data"]) == {"coco_pope_random.json", "coco_pope_popular.json", "coco_pope_adversarial.json"}
    before = (out / "none" / "pope" / "predictions.jsonl").read_text()
    for split in ("random", "popular", "adversarial"):  # every label flipped
        path = data / "pope" / f"coco_pope_{split}.json"
        path.write_text(path.read_text().replace('"yes"', '"tmp"').replace('"no"', '"yes"').replace('"tmp"', '"no"'))
    capsys.readouterr()
    assert pope_cli(data, out) == 1
    err = capsys.readouterr().err
    assert "the data changed since the predictions there were made" in err and "coco_pope_random.json" in err
    assert "Use another --out, or delete" in err
    assert (out / "none" / "pope" / "predictions.jsonl").read_text() == before  # kept as written
    assert pope_cli(data, tmp_path / "fresh") == 0  # a new --out scores the new labels
    summary = json.loads((tmp_path / "fresh" / "none" / "pope" / "summary.json").read_text())
    assert summary["metrics"]["accuracy"] == 50.0 and summary["parsing"] == "official"


def test_more_splits_or_items_into_the_same_out_still_resume(tmp_path, pope_cli):
    data, out = write_all(tmp_path / "data"), tmp_path / "out"
    assert pope_cli(data, out, "--pope-splits", "random", "--limit", "1") == 0
    assert pope_cli(data, out) == 0  # all splits, no limit: same files, more of them
    assert len((out / "none" / "pope" / "predictions.jsonl").read_text().splitlines()) == 6


def test_stored_targets_are_checked_without_a_fingerprint(tmp_path):
    write_pope(tmp_path / "data" / "pope")
    task = get_task("pope")
    items = load_items(task, tmp_path / "data")[0]
    run_benchmark(Scripted(), task, make_config("none", 1.0), items, tmp_path / "out", progress=False)
    items[2].target = "yes" if items[2].target == "no" else "no"
    with pytest.raises(ValueError, match=r"1 answered item\(s\) have another target .*popular/1"):
        run_benchmark(Scripted(), task, make_config("none", 1.0), items, tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------- bad data


def test_vqav2_annotation_without_answers(tmp_path, monkeypatch, capsys):
    data, out = write_all(tmp_path / "data"), tmp_path / "out"
    monkeypatch.setattr(backends_mod, "make_backend", lambda *a, **k: Scripted(answer="2"))
    assert _run(data, out, "pope") == 0
    written = (out / "none" / "pope" / "predictions.jsonl").read_text()
    path = data / "vqav2" / "v2_mscoco_val2014_annotations.json"
    anns = json.loads(path.read_text())
    del anns["annotations"][1]["answers"]
    path.write_text(json.dumps(anns))
    capsys.readouterr()
    assert _run(data, out, "pope,vqav2") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "questions.json:questions[1]: " in err and "annotations.json:annotations[1]: missing field 'answers'" in err
    assert (out / "none" / "pope" / "predictions.jsonl").read_text() == written  # kept
    assert json.loads((out / "results.json").read_text())["results"][0]["bench"] == "pope"
    assert _run(data, out, "vqav2", "--on-error", "skip") == 0  # the other questions are scored
    assert json.loads((out / "none" / "vqav2" / "summary.json").read_text())["n_answered"] == 2


@pytest.mark.parametrize("change, message", [
    (lambda a: a["annotations"][0].update(answers="red"), r"annotations\[0\]: 'answers' should be a list"),
    (lambda a: a["annotations"][0]["answers"][3].pop("answer"), r"annotations\[0\]: answers\[3\]: missing field"),
    (lambda a: a["annotations"].__setitem__(2, "oops"), r"annotations\[2\]: expected an object, got str"),
    (lambda a: a.update(annotations={"x": 1}), r"annotations\.json: field 'annotations' should be a list"),
])
def test_vqav2_malformed_annotations_are_data_errors(tmp_path, change, message):
    write_vqav2(tmp_path / "vqav2")
    path = tmp_path / "vqav2" / "v2_mscoco_val2014_annotations.json"
    anns = json.loads(path.read_text())
    change(anns)
    path.write_text(json.dumps(anns))
    with pytest.raises(DataError, match=message):
        load_items(get_task("vqav2"), tmp_path)


def test_scienceqa_problem_that_is_not_an_object(tmp_path, monkeypatch, capsys):
    data = write_all(tmp_path / "data")
    path = data / "scienceqa" / "problems.json"
    problems = json.loads(path.read_text())
    problems["7"] = ["not", "an", "object"]
    path.write_text(json.dumps(problems))
    monkeypatch.setattr(backends_mod, "make_backend", lambda *a, **k: Scripted(answer="B"))
    assert _run(data, tmp_path / "out", "sqa") == 2
    err = capsys.readouterr().err
    assert "problems.json: problem 7: expected an object, got list" in err and "Traceback" not in err
    assert _run(data, tmp_path / "out", "sqa", "--on-error", "skip") == 0
    for bad, message in [([1, 2], r"problems\.json: expected an object \{id: \.\.\.\}, got list"),
                         ({"5": {**problems["5"], "answer": 7}}, r"problem 5: answer 7 is not the index"),
                         ({"5": {**problems["5"], "choices": "ab"}}, r"problem 5: field 'choices' should be a list")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=message):
            load_items(get_task("sqa"), data)


def test_pope_label_that_is_not_yes_no(tmp_path):
    write_pope(tmp_path / "pope")
    path = tmp_path / "pope" / "coco_pope_random.json"
    path.write_text(path.read_text().replace('"label": "no"', '"label": "maybe"'))
    with pytest.raises(DataError, match=r"coco_pope_random\.json:2: label 'maybe' is not yes/no"):
        load_items(get_task("pope"), tmp_path)


def test_undecodable_files_are_data_errors(tmp_path):
    write_textvqa(tmp_path / "textvqa")
    (tmp_path / "textvqa" / "TextVQA_0.5.1_val.json").write_bytes(b'{"data": "\xff\xfe"}')
    with pytest.raises(DataError, match=r"TextVQA_0\.5\.1_val\.json: not UTF-8"):
        load_items(get_task("textvqa"), tmp_path)


def test_prediction_line_without_id(tmp_path, monkeypatch, capsys):
    data, out = write_all(tmp_path / "data"), tmp_path / "out"
    monkeypatch.setattr(backends_mod, "make_backend", lambda *a, **k: Scripted())
    assert _run(data, out, "pope") == 0
    with open(out / "none" / "pope" / "predictions.jsonl", "a") as f:
        f.write("[1, 2]\n")
    assert _run(data, out, "pope") == 2
    assert "predictions.jsonl:7: a prediction line without an item id" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- layouts


def test_vqav2_and_textvqa_folders_with_train_and_ocr_files(tmp_path):
    write_vqav2(tmp_path / "vqav2")
    _dump(tmp_path / "vqav2" / "v2_OpenEnded_mscoco_train2014_questions.json", {"data_subtype": "train2014", "questions": []})
    _dump(tmp_path / "vqav2" / "v2_mscoco_train2014_annotations.json", {"annotations": []})
    items = load_items(get_task("vqav2"), tmp_path)[0]
    assert [it.id for it in items] == ["100", "101", "102"] and items[0].target[0] == "2"
    write_textvqa(tmp_path / "textvqa")
    for name in ("TextVQA_0.5.1_train.json", "TextVQA_Rosetta_OCR_v0.2_val.json", "TextVQA_Rosetta_OCR_v0.2_train.json"):
        _dump(tmp_path / "textvqa" / name, {"data": []})
    assert len(load_items(get_task("textvqa"), tmp_path)[0]) == 3
    # without the published name, several candidates are still an error that names them
    (tmp_path / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json").rename(tmp_path / "vqav2" / "my_questions.json")
    with pytest.raises(DataError, match=r"several files match '\*_questions\.json' .*looked first for "
                                        r"v2_OpenEnded_mscoco_val2014_questions\.json"):
        load_items(get_task("vqav2"), tmp_path)


def test_llava_pope_layout(tmp_path):
    write_pope(tmp_path / "pope")
    (tmp_path / "pope" / "coco").mkdir()
    for split in ("random", "popular", "adversarial"):
        (tmp_path / "pope" / f"coco_pope_{split}.json").rename(tmp_path / "pope" / "coco" / f"coco_pope_{split}.json")
    (tmp_path / "pope" / "llava_pope_test.jsonl").write_text("")  # LLaVA's question file sits beside
    bench = load_bench(get_task("pope"), tmp_path)
    assert len(bench.items) == 6 and bench.items[0].image.parent.name == "val2014"
    assert set(bench.fingerprint) == {"coco"}


def test_lenient_parsing_is_a_named_option(tmp_path, monkeypatch):
    data, out = write_all(tmp_path / "data"), tmp_path / "out"
    monkeypatch.setattr(backends_mod, "make_backend", lambda *a, **k: Scripted(answer="(B)"))
    assert _run(data, out, "sqa") == 0
    assert json.loads((out / "none" / "scienceqa_img" / "summary.json").read_text())["score"] == 0.0
    assert _run(data, out, "sqa", "--lenient-parsing") == 0  # same predictions, rescored
    summary = json.loads((out / "none" / "scienceqa_img" / "summary.json").read_text())
    assert summary["score"] == 50.0 and summary["parsing"] == "lenient"
    assert "lenient parsing: not comparable" in (out / "results.md").read_text()
