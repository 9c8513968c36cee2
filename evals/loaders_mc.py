"""Multiple-choice benchmarks: ScienceQA-IMG and MMBench. Expected folders (names as published):

ScienceQA (github.com/lupantech/ScienceQA, data/scienceqa/)::

    scienceqa/
      problems.json      # {pid: {"question", "choices": [str], "answer": int, "hint", "image":
                         #        "image.png" | null, "split", ...}}
      pid_splits.json    # {"train": [pid], "val": [pid], "test": [pid], ...}
      images/test/<pid>/image.png

Only questions with an image are asked (the IMG subset: 2017 of the 4241 test questions);
option `sqa_split` picks the split (default test).

MMBench (opencompass MMBench, e.g. MMBench_DEV_EN.tsv)::

    mmbench/
      MMBench_DEV_EN.tsv   # columns index, question, hint, A, B, C, D, answer, category, image
                           # (base64), ...; an image cell holding a short number refers to the
                           # image of the row with that index (VLMEvalKit's deduplicated TSVs)

Circular evaluation (option `mmbench_circular`): every question is also asked with its options
rotated (N options -> N passes, as LLaVA's --all-rounds); it counts only if every pass is right.
Rows with index >= 1,000,000 (TSVs that ship the rotated copies) are grouped with
index % 1,000,000 the same way.

Parquet exports (lmms-eval): lmms-lab/ScienceQA (ScienceQA-IMG config: question, choices,
answer, hint, image) and lmms-lab/MMBench (same columns as the TSV): any *.parquet under the
folder is read instead; needs pyarrow.

Prompt text (LLaVA / lmms-eval): "Context: <hint>\\n" (ScienceQA) or "<hint>\\n" (MMBench) if
there is a hint, the question, then one "A. option" line per option.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

from .data import DataError, Item, field_of, find_one, list_field, read_json, read_tsv, require
from .rows import convert, parquet_files, parquet_rows

LETTERS = "ABCDEFGHIJ"


def _present(value) -> bool:
    """False for the empty cells TSV / pandas exports write for absent options or hints."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value).strip().lower() not in ("", "nan", "none")


def mc_question(question: str, options: dict[str, str], hint: str | None = None, context_label: str = "") -> str:
    """"[<label><hint>\\n]<question>\\nA. <a>\\nB. <b>..." (the option lines LLaVA uses)."""
    head = f"{context_label}{hint}\n" if _present(hint) else ""
    return head + question + "".join(f"\n{k}. {v}" for k, v in options.items())


def _sqa_item(id_: str, r: dict, image, where: str, split: str) -> Item:
    choices = list_field(r, "choices", where)
    if not 2 <= len(choices) <= len(LETTERS):
        raise DataError(f"{where}: {len(choices)} choices (2 to {len(LETTERS)} expected)")
    options = {LETTERS[i]: str(c) for i, c in enumerate(choices)}
    answer = r.get("answer")
    if answer is not None and (not isinstance(answer, int) or not 0 <= answer < len(options)):
        raise DataError(f"{where}: answer {answer!r} is not the index of one of the {len(options)} choices")
    target = LETTERS[answer] if answer is not None else None
    return Item(id=id_, question=mc_question(field_of(r, "question", where), options, r.get("hint"), "Context: "),
                image=image, target=target, where=where, meta={"options": options, "split": split})


def load_scienceqa(root: Path, options: dict) -> Iterator[Item | DataError]:
    split = options.get("sqa_split") or "test"
    if files := parquet_files(root):
        yield from convert(parquet_rows(files), lambda where, r: _sqa_item(
            where.rsplit(":", 1)[-1], r, field_of(r, "image", where), where, split))
        return
    problems_path = require(root / "problems.json", "ScienceQA problems.json")
    problems = read_json(problems_path)
    splits_path = require(root / "pid_splits.json", "ScienceQA pid_splits.json")
    splits = read_json(splits_path)
    for path, obj in ((problems_path, problems), (splits_path, splits)):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: expected an object {{id: ...}}, got {type(obj).__name__}")
    if split not in splits:
        raise DataError(f"{splits_path}: no split {split!r} (has {', '.join(splits)})")
    pids = list_field(splits, split, str(splits_path))

    def rows():
        for pid in pids:
            where = f"{problems_path}: problem {pid}"
            problem = problems.get(pid) if isinstance(pid, str) else None
            if problem is None:
                yield where, DataError(f"{where}: listed in pid_splits.json[{split!r}] but missing")
            elif not isinstance(problem, dict):
                yield where, DataError(f"{where}: expected an object, got {type(problem).__name__}")
            elif problem.get("image"):  # the IMG subset
                yield where, (pid, problem)

    yield from convert(rows(), lambda where, rec: _sqa_item(
        rec[0], rec[1], root / "images" / split / rec[0] / rec[1]["image"], where, split))


def _mmbench_items(where: str, r: dict, images: dict, circular: bool) -> list[Item]:
    index = int(float(field_of(r, "index", where)))
    options = {k: str(r[k]).strip() for k in LETTERS if _present(r.get(k))}
    if len(options) < 2:
        raise DataError(f"{where}: fewer than 2 options")
    image = field_of(r, "image", where)
    if isinstance(image, str) and len(image) <= 64 and image.strip().isdigit():
        ref = int(image)  # deduplicated TSV: the image of another row
        if ref not in images:
            raise DataError(f"{where}: image refers to index {ref}, which has no image")
        image = images[ref]
    images[index] = image
    answer = str(r.get("answer", "")).strip() if _present(r.get("answer")) else None
    if answer is not None and answer not in options:
        raise DataError(f"{where}: answer {answer!r} is not one of the options {list(options)}")
    question = field_of(r, "question", where)
    group = str(index % 1_000_000)
    items = []
    texts = list(options.values())
    for rot in range(len(texts) if circular else 1):
        # rotation k: option i shows the text of option (i + k) mod n
        shown = {LETTERS[i]: texts[(i + rot) % len(texts)] for i in range(len(texts))}
        target = None if answer is None else LETTERS[(list(options).index(answer) - rot) % len(texts)]
        items.append(Item(id=f"{index}" + (f"@{rot}" if rot else ""), question=mc_question(question, shown, r.get("hint")),
                          image=image, target=target, where=where, group=group,
                          meta={"options": shown, "category": r.get("category"),
                                "rotation": rot or index // 1_000_000}))
    return items


def load_mmbench(root: Path, options: dict) -> Iterator[Item | DataError]:
    circular = bool(options.get("mmbench_circular"))
    images: dict[int, object] = {}
    if files := parquet_files(root):
        rows = parquet_rows(files)
    else:
        rows = read_tsv(find_one(root, ["MMBench*.tsv", "*.tsv"], "MMBench TSV"))
    yield from convert(rows, lambda where, r: _mmbench_items(where, r, images, circular))
