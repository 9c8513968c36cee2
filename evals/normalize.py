"""VQA answer normalisation, as the two official scorers do it (rules restated here, not copied):

* `evalai_answer`: the answer processor LLaVA applies to every VQAv2 prediction before
  submission (haotian-liu/LLaVA, scripts/convert_vqav2_for_submission.py) and to predictions and
  human answers alike in its TextVQA scorer (llava/eval/m4c_evaluator.py, EvalAIAnswerProcessor;
  lmms-eval's _task_utils/vqa_eval_metric.py is the same):
  1. lower case; every "," and "?" deleted; "'s" becomes " 's" ("dog's" -> "dog 's"); strip;
  2. newlines and tabs become spaces; strip;
  3. then `process_punctuation` and `process_digit_article` below.
* `normalize_vqa`: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py
  (processPunctuation + processDigitArticle), which the VQAv2 scorer applies to the human
  answers and to the prediction only when the human answers are not all the same
  (metrics.vqa_eval_accuracy).

`process_punctuation`: each of the marks ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted
if the ORIGINAL text has that mark next to a space, or has a digit-comma-digit anywhere;
otherwise it is replaced by a space ("black-and-white" -> "black and white"). Then periods not
followed by a digit are deleted, at most 32 of them (both scripts pass re.UNICODE, = 32, where
re.sub takes `count`).
The apostrophe and the colon are not punctuation here ("12:30" stays).

`process_digit_article`: lower case, split on whitespace; number words zero..ten and "none"
become digits; the articles a / an / the are dropped; then words written without their
apostrophe get it back from the scripts' contraction table (`CONTRACTIONS`, rebuilt below from
its rule), joined with single spaces.
"""

from __future__ import annotations

import re

_MARKS = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT_VQA = re.compile(r"\d,\d")  # vqaEval.py's test
_DIGIT_COMMAS_DIGIT_EVALAI = re.compile(r"(?<=\d),+(?=\d)")  # m4c_evaluator.py's test (never true there:
# its step 1 has already deleted every comma)
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # the scripts' accidental re.sub count (re.UNICODE == 32)

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}

# The contractions the table restores. Its keys are each of these with exactly one apostrophe
# left out ("couldn't've" <- "couldnt've" and "couldn'tve", but not "couldntve"). The table's
# other entries are no-ops after lower-casing ("Im", "Ive", "Id've", "I'dve": keys with capitals)
# or identities ("let's", "she's"), so "im", "lets", "shes", "id", "wed", "shed" stay as they are.
_RESTORED = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
    haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am might've mightn't
    mightn't've must've mustn't needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've
    shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll
    someone's something'd something'd've something'll that's there'd there'd've there're there's
    they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're
    what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
    why's won't would've wouldn't wouldn't've y'all y'all'd've y'all'll you'd you'd've you'll
    you're you've
""".split()


def _one_apostrophe_dropped(word: str) -> list[str]:
    return [word[:i] + word[i + 1:] for i, c in enumerate(word) if c == "'"]


CONTRACTIONS = {key: word for word in _RESTORED for key in _one_apostrophe_dropped(word)}
CONTRACTIONS["somebody'd"] = "somebodyd"  # the table's one entry that goes the other way


def process_punctuation(text: str, evalai: bool = False) -> str:
    """Step 2 of both scorers (module docstring); `evalai` picks m4c_evaluator's digit-comma test."""
    comma_test = _DIGIT_COMMAS_DIGIT_EVALAI if evalai else _DIGIT_COMMA_DIGIT_VQA
    delete_all = comma_test.search(text) is not None
    out = text
    for mark in _MARKS:
        # the test reads the original text, the edit the text so far (as both scripts do)
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str) -> str:
    """Number words -> digits, articles dropped, contractions restored (module docstring)."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa(answer: str) -> str:
    """GT-Vision-Lab's normalisation of one answer: normalize_vqa("Two dogs.") == "2 dogs"."""
    return process_digit_article(process_punctuation(answer))


def evalai_answer(answer: str) -> str:
    """LLaVA's EvalAIAnswerProcessor: evalai_answer("The dog's, ok?") == "dog 's ok"."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text, evalai=True))
