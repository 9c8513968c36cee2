"""VQA answer normalisation, written from the published description of the VQA evaluation
(visualqa.org/evaluation.html), applied to the prediction and to every human answer:

1. newlines and tabs become spaces, surrounding whitespace goes;
2. punctuation except the apostrophe and the colon: a mark next to a space, or any mark in a
   string holding a digit-comma-digit ("1,000"), is deleted; otherwise it becomes a space
   ("black-and-white" -> "black and white");
3. a period is deleted unless a digit follows it ("3.5" stays, "dog." -> "dog");
4. lower case, then per word: number words zero..ten (and "none") become digits, the articles
   a / an / the are dropped, contractions written without the apostrophe get it back
   ("isnt" -> "isn't", "dont" -> "don't").

Deviation from the reference script: it normalises only when the ten human answers disagree;
here both sides are always normalised (what the description says, and what LLaVA / lmms-eval do
to predictions), so "Two" matches ten "2"s.
"""

from __future__ import annotations

import re

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}

# written without apostrophe -> with it; the common English contractions
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldntve": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "id": "i'd", "im": "i'm", "ive": "i've",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "oclock": "o'clock", "shant": "shan't", "shed": "she'd", "shes": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's", "thered": "there'd",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyd": "why'd", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}


def _punctuation(text: str) -> str:
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCT:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", text)


def _words(text: str) -> str:
    out = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        out.append(_CONTRACTIONS.get(word, word))
    return " ".join(out)


def normalize_vqa(answer: str) -> str:
    """The normalised form of one answer: normalize_vqa("Two dogs.") == "2 dogs"."""
    return _words(_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))
