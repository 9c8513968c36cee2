"""Yes/no benchmarks: POPE and MME. Expected folders (names as published):

POPE (github.com/RUCAIBox/POPE, output/coco/; one JSON object per line despite the .json)::

    pope/
      coco_pope_random.json        # {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
      coco_pope_popular.json       #  "text": "Is there a snowboard in the image?", "label": "yes"}
      coco_pope_adversarial.json   # (.jsonl accepted too; splits: option pope_splits)
      val2014/COCO_val2014_000000310196.jpg   # COCO val2014 images (or images/)

The split files may also sit in pope/coco/ (LLaVA's playground layout: pope/coco/coco_pope_*.json
next to pope/val2014/) or pope/output/coco/ (the POPE repository's). Labels must be yes / no.

MME (MME_Benchmark_release_version, as distributed by its authors)::

    mme/                              # or mme/MME_Benchmark_release_version/
      existence/000000006040.jpg      # image and its question file side by side, or
      existence/000000006040.txt      #   one line per question: "<question>\\t<Yes|No>"
      artwork/images/10002.jpg        # the five landmark/artwork/celebrity/posters/scene
      artwork/questions_answers_YN/10002.txt   # subtasks: images/ + questions_answers_YN/

Subtasks missing from the folder are left out of the sums (perception: existence, count,
position, color, posters, celebrity, scene, landmark, artwork, OCR; cognition:
commonsense_reasoning, numerical_calculation, text_translation, code_reasoning).

Parquet exports (lmms-eval): lmms-lab/POPE (columns question_id, question, answer, image,
category = split) and lmms-lab/MME (question_id = "<subtask>/<image file>", question, answer,
image, category): any *.parquet under the folder is read instead; needs pyarrow.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator

from .data import DataError, Item, field_of, note_read, read_jsonl, require
from .metrics import MME_COGNITION, MME_PERCEPTION
from .rows import convert, image_folder, parquet_files, parquet_rows

POPE_SPLITS = ["random", "popular", "adversarial"]
_IMAGE_SUFFIXES = [".jpg", ".png", ".jpeg"]


def load_pope(root: Path, options: dict) -> Iterator[Item | DataError]:
    splits = options.get("pope_splits") or POPE_SPLITS
    if files := parquet_files(root):
        def make_pq(where, r):
            split = str(field_of(r, "category", where))
            return Item(id=f"{split}/{field_of(r, 'question_id', where)}", question=field_of(r, "question", where),
                        image=field_of(r, "image", where), target=_pope_label({"label": r.get("answer")}, where),
                        where=where, meta={"split": split})

        yield from (i for i in convert(parquet_rows(files), make_pq)
                    if isinstance(i, DataError) or i.meta["split"] in splits)
        return
    images = image_folder(root, ["val2014", "images"])
    found = False
    for split in splits:
        path = _pope_file(root, split)
        if path is None:
            if options.get("pope_splits"):  # asked for explicitly: its file must be there
                require(root / f"coco_pope_{split}.json", f"POPE {split} split")
            continue
        found = True

        def make(where, r, split=split):
            return Item(id=f"{split}/{field_of(r, 'question_id', where)}", question=field_of(r, "text", where),
                        image=images / field_of(r, "image", where), target=_pope_label(r, where),
                        where=where, meta={"split": split})

        yield from convert(read_jsonl(path), make)
    if not found:
        raise DataError(f"{root}: no POPE split file (coco_pope_{{{','.join(splits)}}}.json, "
                        "also looked in coco/ and output/coco/)")


def _pope_file(root: Path, split: str) -> Path | None:
    """The split's file in pope/, pope/coco/ (LLaVA) or pope/output/coco/ (POPE's repository)."""
    for folder in (root, root / "coco", root / "output" / "coco"):
        for name in (f"coco_pope_{split}.json", f"coco_pope_{split}.jsonl"):
            if (folder / name).is_file():
                return folder / name
    return None


def _pope_label(r: dict, where: str) -> str | None:
    """"yes" / "no" (any case), None if absent; anything else is bad data (the official scorer
    would silently count it as yes)."""
    if r.get("label") in (None, ""):
        return None
    label = str(r["label"]).strip().lower()
    if label not in ("yes", "no"):
        raise DataError(f"{where}: label {r['label']!r} is not yes/no")
    return label


def _mme_base(root: Path) -> Path:
    nested = root / "MME_Benchmark_release_version"
    return nested if nested.is_dir() else root


def _mme_rows(base: Path) -> Iterator[tuple[str, object]]:
    """(where = "file.txt:line", {"category", "image", "question", "answer"}) per question line."""
    subtasks = [s for s in MME_PERCEPTION + MME_COGNITION if (base / s).is_dir()]
    if not subtasks:
        raise DataError(f"{base}: no MME subtask folder (existence/, count/, ..., code_reasoning/)")
    for sub in subtasks:
        folder = base / sub
        qa = folder / "questions_answers_YN"
        txt_dir, img_dir = (qa, folder / "images") if qa.is_dir() else (folder, folder)
        for txt in sorted(txt_dir.glob("*.txt")):
            image = next((img_dir / (txt.stem + s) for s in _IMAGE_SUFFIXES if (img_dir / (txt.stem + s)).exists()),
                         img_dir / (txt.stem + ".jpg"))  # missing: the item's image error names it
            try:
                text = note_read(txt).read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                yield f"{txt}", DataError(f"{txt}: not UTF-8 text (byte {e.start})")
                continue
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{txt}:{lineno}"
                parts = line.split("\t")
                if len(parts) != 2:
                    yield where, DataError(f"{where}: expected '<question>\\t<Yes|No>', got {len(parts)} field(s)")
                    continue
                yield where, {"category": sub, "image": image, "question": parts[0].strip(), "answer": parts[1]}


def load_mme(root: Path, options: dict) -> Iterator[Item | DataError]:
    files = parquet_files(root)
    seen: Counter = Counter()

    def make(where, r):
        sub = field_of(r, "category", where)
        image = field_of(r, "image", where)
        # the pair of questions about one image is scored together (acc+)
        group = str(r["question_id"]) if files else f"{sub}/{Path(image).name}"
        seen[group] += 1
        answer = str(field_of(r, "answer", where)).strip().lower()
        if answer not in ("yes", "no"):
            raise DataError(f"{where}: answer {answer!r} is not yes/no")
        return Item(id=f"{group}#{seen[group]}", question=field_of(r, "question", where), image=image,
                    target=answer, where=where, meta={"category": sub}, group=group)

    yield from convert(parquet_rows(files) if files else _mme_rows(_mme_base(root)), make)
