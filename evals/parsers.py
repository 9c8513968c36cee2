"""How each benchmark's official scorer reads a free-form answer (rules restated from the scripts
named in each docstring, not copied), and forgiving readers (the harness's earlier ones, and
lmms-eval's for MME) used only under `--lenient-parsing`.

Every official reader starts from the prediction with surrounding whitespace stripped: LLaVA's
runners store `decode(...).strip()` (llava/eval/model_vqa_loader.py, model_vqa_science.py,
model_vqa_mmbench.py), and so do this harness's backends.
"""

from __future__ import annotations

import re

# ------------------------------------------------------------------------------ yes / no


def pope_answer(prediction: str) -> str:
    """POPE: "no" or "yes" (RUCAIBox/POPE evaluate.py; haotian-liu/LLaVA llava/eval/eval_pope.py).

    Rule: keep the text before the first period; delete commas; split on single spaces (not on
    other whitespace); "no" if one of the words is exactly "No", "no" or "not", else "yes".
    Quirks kept: "NO", "Not at all." and "No!" read as yes (case-sensitive whole words), and
    "...no" too (its first sentence is empty)."""
    first_sentence = prediction.strip().split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def mme_answer(prediction: str) -> str:
    """MME: "yes", "no" or "other" (always wrong) (MME's calculation.py, in tools/eval_tool.zip of
    BradyFU/Awesome-Multimodal-Large-Language-Models, run by LLaVA's scripts/v1_5/eval/mme.sh).

    Rule: lower case; the answer itself if it is "yes" or "no"; else "yes" if its first four
    characters contain "yes", else "no" if they contain "no", else "other". Quirks kept: "nope",
    "Not sure" and "None" read as no; "It is yes" and "y" as other."""
    text = prediction.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


# ------------------------------------------------------------------------ multiple choice

_SQA_LETTERS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options default (a list: "AB" is no member)
# "." here is any one character, as in the script: a final "The answer is B" (nothing after the
# letter) does not match, "The answer is B," does.
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def sqa_letter(prediction: str, options: dict) -> str | None:
    """ScienceQA: the option letter, or None (haotian-liu/LLaVA llava/eval/eval_science_qa.py).

    Rule: the whole answer is one of A..E; or it is at least 3 characters starting with one of
    A..E followed by ". " ("B. three"); or "The answer is X" followed by any character occurs
    exactly once (case-sensitive). The letter counts only if it is among the first
    len(options) of A..E. Quirks kept: "(B)", "B." (no space after the period), "b", "three"
    (an option's text) and "the answer is B." are unparsed, i.e. wrong."""
    text = prediction.strip()
    if text in _SQA_LETTERS:
        letter = text
    elif len(text) >= 3 and text[0] in _SQA_LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _SQA_ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in _SQA_LETTERS[:len(options)] else None


# VLMEvalKit treats these as a refusal ("Z": never right) wherever they occur in the answer.
_MMB_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                 "I'm sorry, but without the image provided", "Cannot determine the answer")
_MMB_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_MMB_ANSWER_IS = re.compile(r"(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", re.IGNORECASE)
_REFUSED = "Z"


def _mmbench_option(answer: str, options: dict) -> str | None:
    """VLMEvalKit's can_infer_option: a letter, "Z" (refused) or None (see mmbench_letter)."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in _MMB_REFUSALS):
        return _REFUSED
    words = answer.translate(_MMB_SEPARATORS).split()
    named = [k for k in options if k in words]
    if len(named) == 1:
        if words.index(named[0]) > len(words) - 5:  # among the last four words
            return named[0]
    elif not named and "Z" in words:
        return _REFUSED
    m = _MMB_ANSWER_IS.search(answer)
    return m.group(1).upper() if m and m.group(1).upper() in options else None


def _mmbench_text(answer: str, options: dict) -> str | None:
    """VLMEvalKit's can_infer_text (see mmbench_letter)."""
    low = answer.lower()
    if len(low) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    hits = [k for k, v in options.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def mmbench_letter(prediction: str, options: dict) -> str | None:
    """MMBench: the option letter, or None (open-compass/VLMEvalKit vlmeval/utils/matching_util.py
    `can_infer` at commit 2cf2a36c, with VERBOSE unset; exact matching, i.e. no LLM judge).

    Rule (can_infer_option, then can_infer_text if that gives nothing):
    1. a refusal phrase anywhere -> refused (wrong, and no text matching);
    2. replace each of . ( ) [ ] , : ; ! * # { } by a space and split into words; if exactly one
       option letter is a word, it is the answer provided its first occurrence is among the last
       four words; if no option letter is a word but "Z" is -> refused;
    3. otherwise "answer is X" / "correct answer is **X**" (any case, X in A-D and an option);
    4. can_infer_text: if the answer is at most twice as long as all option texts together, the
       one option whose lower-cased text occurs in the lower-cased answer.
    Examples: "It is circle." -> the option "circle" (rule 4); "A circle one is in the picture."
    -> not A (rule 2: "A" is the first of 7 words), so the option "circle" (rule 4)."""
    text = prediction.strip()
    letter = _mmbench_option(text, options)
    if letter == _REFUSED:
        return None
    return letter or _mmbench_text(text, options)


# ---------------------------------------------------------------------------- short answer


def gqa_answer(prediction: str) -> str:
    """GQA: the prediction as LLaVA hands it to GQA's eval.py, which compares it to the answer
    exactly (haotian-liu/LLaVA scripts/convert_gqa_for_eval.py): final periods removed, then
    lower case. Quirk kept: "yes ." keeps its space and is wrong."""
    return prediction.strip().rstrip(".").lower()


# ------------------------------------------------------------ --lenient-parsing (not official)


def lenient_yes_no(prediction: str) -> str:
    """"no" if the first sentence has the word no / not in any case, commas and all whitespace
    as separators; else "yes"."""
    words = prediction.split(".")[0].replace(",", " ").lower().split()
    return "no" if ("no" in words or "not" in words) else "yes"


def lenient_mme(prediction: str) -> str:
    """lmms-eval's MME reading (lmms_eval/tasks/mme/utils.py parse_pred_ans): lower case,
    strip, periods removed; "y" / "n" alone count; then the official four-character rule."""
    text = prediction.lower().strip().replace(".", "")
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    return mme_answer(text)


_LENIENT_LETTER = [
    re.compile(r"^\(?([A-Z])\)?(?:$|[\s.:,)])"),  # "B", "B.", "(B)", "B: red"
    re.compile(r"answer is:?\s*\(?([A-Z])\)?\b", re.IGNORECASE),  # "The answer is (C)"
]


def lenient_letter(prediction: str, options: dict) -> str | None:
    """A leading letter ("B", "(B)", "B. red"), "the answer is B", or the full text of exactly
    one option ("red")."""
    text = prediction.strip()
    for pattern in _LENIENT_LETTER:
        m = pattern.search(text)
        if m and m.group(1).upper() in options:
            return m.group(1).upper()
    hits = [k for k, v in options.items() if text.lower().rstrip(".") == str(v).strip().lower()]
    return hits[0] if len(hits) == 1 else None


def lenient_gqa(prediction: str) -> str:
    """Strip, final period and whitespace removed, lower case."""
    return prediction.strip().rstrip(".").strip().lower()
