"""Short-answer benchmarks: VQAv2, GQA, TextVQA. Expected folders (names as published):

VQAv2 (visualqa.org)::

    vqav2/
      v2_OpenEnded_mscoco_val2014_questions.json   # {"data_subtype": "val2014", "questions":
                                                   #   [{"question_id", "image_id", "question"}]}
      v2_mscoco_val2014_annotations.json           # {"annotations": [{"question_id", "answers":
                                                   #   [{"answer": str} x 10], ...}]}; optional
                                                   #   (test-dev: predictions only, no score)
      val2014/COCO_val2014_000000262148.jpg        # COCO images, COCO_<subtype>_<image_id:012>.jpg
                                                   # (test-dev2015 -> test2015/COCO_test2015_...)

GQA (cs.stanford.edu/people/dorarad/gqa)::

    gqa/
      testdev_balanced_questions.json   # {qid: {"imageId", "question", "answer", ...}}
      images/n161313.jpg                # <imageId>.jpg

TextVQA (textvqa.org)::

    textvqa/
      TextVQA_0.5.1_val.json    # {"data": [{"question_id", "question", "image_id", "answers": [10 str]}]}
      train_images/<image_id>.jpg  # val images live in train_images (test: test_images)

A folder that also holds other files of the release (train questions / annotations, TextVQA's
OCR files) is fine: the evaluation files are found by their published names first
(v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_<subtype>_annotations.json for the
questions' data_subtype, TextVQA_0.5.1_val.json); other names are used only when they are the
one match.

Parquet exports (lmms-eval's lmms-lab/VQAv2, lmms-lab/textvqa): any *.parquet under the folder
(with columns question_id, question, image, answers) is read instead of the JSON; needs pyarrow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .data import DataError, Item, field_of, find_one, list_field, read_json
from .rows import convert, image_folder, parquet_files, parquet_rows


def _answers(value, where: str) -> list[str]:
    """10 human answers from [{"answer": str}, ...] (VQAv2) or [str, ...] (TextVQA)."""
    if not isinstance(value, list):
        raise DataError(f"{where}: 'answers' should be a list, got {type(value).__name__}")
    return [str(field_of(a, "answer", f"{where}: answers[{i}]")) if isinstance(a, dict) else str(a)
            for i, a in enumerate(value)]


def _annotations(path, anns) -> dict:
    """{question_id: human answers, or the DataError of a bad annotation} (raised per question)."""
    out: dict = {}
    for i, a in enumerate(list_field(anns, "annotations", str(path))):
        where = f"{path}:annotations[{i}]"
        qid = field_of(a, "question_id", where)  # without it the annotation's question is unknown: stop
        if not isinstance(qid, (int, str)):
            raise DataError(f"{where}: question_id {qid!r} is not a number or a string")
        try:
            out[qid] = _answers(field_of(a, "answers", where), where)
        except DataError as e:  # only this question is bad: raised (or skipped) when it is made
            out[qid] = e
    return out


def _parquet(files: list[Path]) -> Iterator[Item | DataError]:
    def make(where, r):
        qid = field_of(r, "question_id", where)
        answers = r.get("answers")
        return Item(id=str(qid), question=field_of(r, "question", where), image=field_of(r, "image", where),
                    target=_answers(answers, where) if answers else None, where=where)

    return convert(parquet_rows(files), make)


def load_vqav2(root: Path, options: dict) -> Iterator[Item | DataError]:
    if files := parquet_files(root):
        yield from _parquet(files)
        return
    q_path = find_one(root, ["*_questions.json", "*questions*.json"], "VQAv2 questions JSON",
                      official=["v2_OpenEnded_mscoco_val2014_questions.json"])
    questions = read_json(q_path)
    subtype = str(questions.get("data_subtype", "val2014")) if isinstance(questions, dict) else "val2014"
    image_subtype = "test2015" if subtype.startswith("test") else subtype  # test-dev images are test2015's
    images = image_folder(root, [image_subtype, "images"])
    a_path = None
    if not subtype.startswith("test"):  # no annotations are published for the test splits
        a_path = find_one(root, [f"*{subtype}*annotations*.json", "*_annotations.json", "*annotations*.json"],
                          "VQAv2 annotations JSON", required=False, official=[f"v2_mscoco_{subtype}_annotations.json"])
    answers = _annotations(a_path, read_json(a_path)) if a_path is not None else None

    def make(where, q):
        qid = field_of(q, "question_id", where)
        image_id = int(field_of(q, "image_id", where))
        target = None
        if answers is not None:
            if qid not in answers:
                raise DataError(f"{where}: question_id {qid} has no entry in {a_path.name}")
            target = answers[qid]
            if isinstance(target, DataError):  # its annotation is malformed
                raise target
        return Item(id=str(qid), question=field_of(q, "question", where), target=target, where=where,
                    image=images / f"COCO_{image_subtype}_{image_id:012d}.jpg")

    rows = list_field(questions, "questions", str(q_path))
    yield from convert(((f"{q_path}:questions[{i}]", q) for i, q in enumerate(rows)), make)


def load_gqa(root: Path, options: dict) -> Iterator[Item | DataError]:
    q_path = find_one(root, ["testdev_balanced_questions.json", "*_questions.json", "*questions*.json"],
                      "GQA questions JSON")
    questions = read_json(q_path)
    if not isinstance(questions, dict):
        raise DataError(f"{q_path}: expected {{question_id: question}}, got {type(questions).__name__}")
    images = image_folder(root, ["images"])

    def make(where, q):
        return Item(id=where.rsplit(" ", 1)[-1], question=field_of(q, "question", where),
                    image=images / f"{field_of(q, 'imageId', where)}.jpg", target=q.get("answer"), where=where)

    yield from convert(((f"{q_path}: question {qid}", q) for qid, q in questions.items()), make)


def load_textvqa(root: Path, options: dict) -> Iterator[Item | DataError]:
    if files := parquet_files(root):
        yield from _parquet(files)
        return
    path = find_one(root, ["TextVQA_0.5.1_*.json", "TextVQA_*.json", "*textvqa*.json", "*.json"], "TextVQA JSON",
                    official=["TextVQA_0.5.1_val.json"])
    data = read_json(path)
    split = str(data.get("dataset_type", "val")) if isinstance(data, dict) else "val"
    images = image_folder(root, ["test_images" if split == "test" else "train_images", "images"])

    def make(where, q):
        answers = q.get("answers")
        return Item(id=str(field_of(q, "question_id", where)), question=field_of(q, "question", where),
                    image=images / f"{field_of(q, 'image_id', where)}.jpg",
                    target=_answers(answers, where) if answers else None, where=where)

    rows = list_field(data, "data", str(path))
    yield from convert(((f"{path}:data[{i}]", q) for i, q in enumerate(rows)), make)
