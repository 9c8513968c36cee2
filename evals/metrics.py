"""Benchmark metrics, each a function of the prediction records of one benchmark run.

A record is one line of predictions.jsonl: {"id", "prediction": str, "target", "meta": {...},
"group": str, ...}. Every metric returns a flat {name: float} dict (scores in percent, counts
as ints); the task table names which key is the headline (`Task.primary` / `Task.prefer`).
Records whose target is None (unlabelled splits) are not scored.

By default each metric is its benchmark's official scorer, quirks included (the readers are in
parsers.py, the VQA normalisation in normalize.py, the sources in their docstrings and in
evals/README.md). `lenient=True` (`--lenient-parsing`) swaps in forgiving readers that are not
official; numbers made that way are not comparable with published ones.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

from . import parsers
from .normalize import evalai_answer, normalize_vqa

# ------------------------------------------------------------------------ per-answer scores


def leave_one_out(prediction: str, answers: list[str]) -> float:
    """VQA accuracy in [0, 1] of an already normalised prediction: min(1, matches / 3) over each
    of the leave-one-out subsets of the human answers (10 subsets of 9 for the usual 10), averaged."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    scores = []
    for left_out in range(len(answers)):
        matches = sum(1 for j, gt in enumerate(answers) if j != left_out and gt == prediction)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def _spaced(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_eval_accuracy(prediction: str, answers: list[str]) -> float:
    """GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py: newlines and tabs to
    spaces and strip on every string; if the human answers are not all the same, normalise them
    and the prediction (normalize_vqa); compare exactly. Quirk kept: when the humans agree,
    nothing is normalised ("Two" scores 0 against ten "2")."""
    pred, gts = _spaced(prediction), [_spaced(a) for a in answers]
    if len(set(gts)) > 1:
        pred, gts = normalize_vqa(pred), [normalize_vqa(a) for a in gts]
    return leave_one_out(pred, gts)


def vqav2_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 as LLaVA scores it: its answer processor on the prediction
    (scripts/convert_vqav2_for_submission.py), then GT-Vision-Lab's scorer (vqa_eval_accuracy)."""
    return vqa_eval_accuracy(evalai_answer(prediction), answers)


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
    """TextVQA as LLaVA scores it (llava/eval/m4c_evaluator.py TextVQAAccuracyEvaluator, also
    lmms-eval's textvqa): the answer processor on the prediction and on every human answer."""
    return leave_one_out(evalai_answer(prediction), [evalai_answer(a) for a in answers])


def lenient_vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """--lenient-parsing: both sides always normalised (lmms-eval's vqav2 rule)."""
    return leave_one_out(normalize_vqa(_spaced(prediction)), [normalize_vqa(_spaced(a)) for a in answers])


def gqa_correct(prediction: str, answer: str, lenient: bool = False) -> bool:
    """GQA: LLaVA's reading (parsers.gqa_answer) equal to the answer as released."""
    if lenient:
        return parsers.lenient_gqa(prediction) == str(answer).strip().lower()
    return parsers.gqa_answer(prediction) == str(answer)


# ------------------------------------------------------------------------ per-benchmark metrics


def _scored(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if r.get("target") is not None]


def _pct(num: float, den: int) -> float:
    return 100.0 * num / den if den else 0.0


def _mean_score(records: list[dict], score: Callable[[str, list[str]], float]) -> dict:
    rs = _scored(records)
    return {"accuracy": _pct(sum(score(r["prediction"], r["target"]) for r in rs), len(rs)), "n": len(rs)}


def vqav2_metric(records: list[dict], lenient: bool = False) -> dict:
    """VQAv2: mean VQA accuracy (%), n scored."""
    return _mean_score(records, lenient_vqa_accuracy if lenient else vqav2_accuracy)


def textvqa_metric(records: list[dict], lenient: bool = False) -> dict:
    """TextVQA: mean VQA accuracy (%), n scored."""
    return _mean_score(records, lenient_vqa_accuracy if lenient else textvqa_accuracy)


def gqa_metric(records: list[dict], lenient: bool = False) -> dict:
    """GQA: exact-match accuracy (%)."""
    return _mean_score(records, lambda p, t: float(gqa_correct(p, t, lenient)))


def pope_counts(pairs: Iterable[tuple[str, str]]) -> dict:
    """Confusion counts of (predicted, label) yes/no pairs; "yes" is the positive class."""
    c = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for pred, label in pairs:
        key = ("t" if pred == label else "f") + ("p" if pred == "yes" else "n")
        c[key] += 1
    return c


def pope_scores(c: dict) -> dict:
    """accuracy, precision, recall, F1, yes-ratio (% of predictions that are yes) from counts."""
    n = c["tp"] + c["fp"] + c["tn"] + c["fn"]
    precision = _pct(c["tp"], c["tp"] + c["fp"])
    recall = _pct(c["tp"], c["tp"] + c["fn"])
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": _pct(c["tp"] + c["tn"], n), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": _pct(c["tp"] + c["fp"], n), "n": n}


def pope_metric(records: list[dict], lenient: bool = False) -> dict:
    """POPE: per split `{split}/{accuracy,precision,recall,f1,yes_ratio,n}`, and their mean over
    splits as `accuracy`, `f1`, ... (what papers report as the POPE number is `f1` or `accuracy`).
    A label other than "no" is positive (eval_pope.py); the loader accepts yes / no only."""
    read = parsers.lenient_yes_no if lenient else parsers.pope_answer
    by_split: dict[str, list] = defaultdict(list)
    for r in _scored(records):
        label = "no" if str(r["target"]).strip().lower() == "no" else "yes"
        by_split[r["meta"]["split"]].append((read(r["prediction"]), label))
    out: dict = {}
    per = {split: pope_scores(pope_counts(pairs)) for split, pairs in sorted(by_split.items())}
    for split, scores in per.items():
        out.update({f"{split}/{k}": v for k, v in scores.items()})
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        out[k] = sum(s[k] for s in per.values()) / len(per) if per else 0.0
    out["n"] = sum(s["n"] for s in per.values())
    return out


MME_PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR"]
MME_COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]


def mme_metric(records: list[dict], lenient: bool = False) -> dict:
    """MME: per subtask score = 100 * (acc + acc+), acc over questions, acc+ over images whose
    questions (normally a yes and a no) are all right; `perception` / `cognition` = sums over the
    subtasks present (full sets: max 2000 / 800), `total` = both; `unparsed` = answers read as
    "other" (neither yes nor no: always wrong)."""
    read = parsers.lenient_mme if lenient else parsers.mme_answer
    questions: dict[str, list[bool]] = defaultdict(list)
    images: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    unparsed = 0
    for r in _scored(records):
        sub = r["meta"]["category"]
        label = read(r["prediction"])
        unparsed += label == "other"
        ok = label == str(r["target"]).strip().lower()
        questions[sub].append(ok)
        images[sub][r["group"]].append(ok)
    out: dict = {}
    for sub, oks in sorted(questions.items()):
        acc = _pct(sum(oks), len(oks))
        acc_plus = _pct(sum(all(v) for v in images[sub].values()), len(images[sub]))
        out.update({f"{sub}/acc": acc, f"{sub}/acc_plus": acc_plus, f"{sub}/score": acc + acc_plus})
    out["perception"] = sum(out.get(f"{s}/score", 0.0) for s in MME_PERCEPTION)
    out["cognition"] = sum(out.get(f"{s}/score", 0.0) for s in MME_COGNITION)
    out["total"] = out["perception"] + out["cognition"]
    out["n"] = sum(len(v) for v in questions.values())
    out["unparsed"] = unparsed
    return out


def _mc_metric(records: list[dict], read: Callable[[str, dict], str | None]) -> dict:
    """Multiple-choice accuracy (%) with `read` giving the letter of an answer (None: unparsed,
    wrong). If the records form circular groups (MMBench: one question with its options rotated),
    also `circular_accuracy`: a question counts only if every rotation is right (VLMEvalKit
    vlmeval/dataset/utils/multiple_choice.py, mcq_circular_eval); `accuracy` is then over the
    unrotated items."""
    rs = _scored(records)
    letters = [read(r["prediction"], r["meta"]["options"]) for r in rs]
    right = [letter == r["target"] for letter, r in zip(letters, rs)]
    plain = [i for i, r in enumerate(rs) if r["meta"].get("rotation", 0) == 0]
    out = {"accuracy": _pct(sum(right[i] for i in plain), len(plain)), "n": len(plain),
           "unparsed": sum(letters[i] is None for i in plain)}
    groups: dict[str, list[bool]] = defaultdict(list)
    for r, ok in zip(rs, right):
        groups[r["group"]].append(ok)
    if any(len(g) > 1 for g in groups.values()):
        out["circular_accuracy"] = _pct(sum(all(g) for g in groups.values()), len(groups))
        out["n_circular"] = len(groups)
    return out


def sqa_metric(records: list[dict], lenient: bool = False) -> dict:
    """ScienceQA-IMG: accuracy (%) with LLaVA's letter reading (parsers.sqa_letter)."""
    return _mc_metric(records, parsers.lenient_letter if lenient else parsers.sqa_letter)


def mmbench_metric(records: list[dict], lenient: bool = False) -> dict:
    """MMBench: accuracy (%) with VLMEvalKit's matching (parsers.mmbench_letter), and
    circular_accuracy (the published number) when the rotations were asked."""
    return _mc_metric(records, parsers.lenient_letter if lenient else parsers.mmbench_letter)
