"""Benchmark metrics, each a function of the prediction records of one benchmark run.

A record is one line of predictions.jsonl: {"id", "prediction": str, "target", "meta": {...},
"group": str, ...}. Every metric returns a flat {name: float} dict (scores in percent, counts
as ints); the task table names which key is the headline (`primary`). Records whose target is
None (unlabelled splits) are not scored.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable

from .normalize import normalize_vqa

# ------------------------------------------------------------------------ per-answer scores


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy in [0, 1]: min(1, matches / 3) over each of the leave-one-out subsets of the
    human answers (10 subsets of 9 for the usual 10 answers), averaged; both sides normalised."""
    pred = normalize_vqa(prediction)
    gts = [normalize_vqa(a) for a in answers]
    if not gts:
        raise ValueError("vqa_accuracy needs at least one human answer")
    scores = []
    for left_out in range(len(gts)):
        matches = sum(1 for j, gt in enumerate(gts) if j != left_out and gt == pred)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def exact_match(prediction: str, answer: str) -> bool:
    """GQA: lower case, trailing period and whitespace removed, then equal (LLaVA's GQA eval)."""
    return prediction.strip().rstrip(".").strip().lower() == str(answer).strip().lower()


def yes_no(prediction: str) -> str:
    """POPE's reading of a free answer: "no" if the first sentence has the word no / not, else "yes"."""
    words = prediction.split(".")[0].replace(",", " ").lower().split()
    return "no" if ("no" in words or "not" in words) else "yes"


def mme_label(prediction: str) -> str:
    """MME's reading: "yes" / "no" if the answer is that word or starts with it (first 4
    characters, lower case, periods removed), else "other" (always wrong)."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


_LETTER_PATTERNS = [
    re.compile(r"^\(?([A-Z])\)?(?:$|[\s.:,)])"),  # "B", "B.", "(B)", "B: red"
    re.compile(r"answer is:?\s*\(?([A-Z])\)?\b", re.IGNORECASE),  # "The answer is (C)"
]


def option_letter(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a multiple-choice answer gives: a leading letter ("B", "(B)", "B. red"),
    "the answer is B", or the full text of exactly one option; None if none of these."""
    text = prediction.strip()
    for pattern in _LETTER_PATTERNS:
        m = pattern.search(text)
        if m and m.group(1).upper() in options:
            return m.group(1).upper()
    hits = [k for k, v in options.items() if text.lower().rstrip(".") == str(v).strip().lower()]
    return hits[0] if len(hits) == 1 else None


# ------------------------------------------------------------------------ per-benchmark metrics


def _scored(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if r.get("target") is not None]


def _pct(num: float, den: int) -> float:
    return 100.0 * num / den if den else 0.0


def vqa_metric(records: list[dict]) -> dict:
    """VQAv2 / TextVQA: mean VQA accuracy (%), n scored."""
    rs = _scored(records)
    return {"accuracy": _pct(sum(vqa_accuracy(r["prediction"], r["target"]) for r in rs), len(rs)), "n": len(rs)}


def exact_match_metric(records: list[dict]) -> dict:
    """GQA: exact-match accuracy (%)."""
    rs = _scored(records)
    return {"accuracy": _pct(sum(exact_match(r["prediction"], r["target"]) for r in rs), len(rs)), "n": len(rs)}


def pope_counts(pairs: Iterable[tuple[str, str]]) -> dict:
    """Confusion counts of (predicted, label) yes/no pairs; "yes" is the positive class."""
    c = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for pred, label in pairs:
        key = ("t" if pred == label else "f") + ("p" if pred == "yes" else "n")
        c[key] += 1
    return c


def pope_scores(c: dict) -> dict:
    """accuracy, precision, recall, F1, yes-ratio (%) from confusion counts."""
    n = c["tp"] + c["fp"] + c["tn"] + c["fn"]
    precision = _pct(c["tp"], c["tp"] + c["fp"])
    recall = _pct(c["tp"], c["tp"] + c["fn"])
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": _pct(c["tp"] + c["tn"], n), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": _pct(c["tp"] + c["fp"], n), "n": n}


def pope_metric(records: list[dict]) -> dict:
    """POPE: per split `{split}/{accuracy,precision,recall,f1,yes_ratio,n}`, and their mean over
    splits as `accuracy`, `f1`, ... (what papers report as the POPE number is `f1` or `accuracy`)."""
    by_split: dict[str, list] = defaultdict(list)
    for r in _scored(records):
        by_split[r["meta"]["split"]].append((yes_no(r["prediction"]), str(r["target"]).strip().lower()))
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


def mme_metric(records: list[dict]) -> dict:
    """MME: per subtask score = 100 * (acc + acc+), acc over questions, acc+ over images whose
    questions (normally a yes and a no) are all right; `perception` / `cognition` = sums over the
    subtasks present (full sets: max 2000 / 800), `total` = both."""
    questions: dict[str, list[bool]] = defaultdict(list)
    images: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in _scored(records):
        sub = r["meta"]["category"]
        ok = mme_label(r["prediction"]) == str(r["target"]).strip().lower()
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
    return out


def mc_correct(record: dict) -> bool:
    return option_letter(record["prediction"], record["meta"]["options"]) == record["target"]


def mc_metric(records: list[dict]) -> dict:
    """ScienceQA-IMG / MMBench: multiple-choice accuracy (%). If the records form circular groups
    (MMBench: one question with its options rotated), also `circular_accuracy`: a question
    counts only if every rotation is right; `accuracy` is then over the unrotated items."""
    rs = _scored(records)
    plain = [r for r in rs if r["meta"].get("rotation", 0) == 0]
    out = {"accuracy": _pct(sum(mc_correct(r) for r in plain), len(plain)), "n": len(plain)}
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in rs:
        groups[r["group"]].append(mc_correct(r))
    if any(len(g) > 1 for g in groups.values()):
        out["circular_accuracy"] = _pct(sum(all(g) for g in groups.values()), len(groups))
        out["n_circular"] = len(groups)
    return out
