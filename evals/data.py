"""Items, data errors and the readers every benchmark loader shares.

An `Item` is one question of one benchmark, as the runner and the metrics see it:

    Item(id="pope/random/17",               # unique within the benchmark; resume key
         question="Is there a dog in the image?",  # text before the prompt suffix (options included)
         image=Path(".../COCO_val2014_000000310196.jpg"),  # or bytes, or a base64 str: opened lazily
         target="yes",                       # what the metric compares against (None: no labels)
         where="coco_pope_random.json:17",   # file:row, named by every error about this item
         meta={"split": "random"},           # benchmark-specific (split, category, group, ...)
         group="random/17")                  # items scored together (MME image pair, MMBench circle)

Readers raise `DataError("file:row: what is wrong")`; the runner raises or skips it per
`--on-error`. Images are only opened when their batch runs, so a broken image costs one item.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


class DataError(Exception):
    """Bad benchmark data; the message starts with the file (and row) it is about."""


@dataclass
class Item:
    id: str
    question: str
    image: Any  # Path | bytes | base64 str | {"bytes": ..., "path": ...} (parquet image struct)
    target: Any
    where: str
    meta: dict = field(default_factory=dict)
    group: str | None = None

    def __post_init__(self) -> None:
        if self.group is None:
            self.group = self.id


def require(path: Path, what: str) -> Path:
    """`path` if it exists, else a DataError naming it and what it should be."""
    if not path.exists():
        raise DataError(f"{path}: missing ({what})")
    return path


def find_one(folder: Path, patterns: list[str], what: str, required: bool = True) -> Path | None:
    """The single file in `folder` matching the first pattern that matches anything."""
    require(folder, f"folder of {what}")
    for pattern in patterns:
        hits = sorted(folder.glob(pattern))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            names = ", ".join(h.name for h in hits)
            raise DataError(f"{folder}: several files match {pattern!r} ({names}); keep one {what}")
    if required:
        raise DataError(f"{folder}: no {what} (looked for {', '.join(patterns)})")
    return None


def read_json(path: Path) -> Any:
    try:
        with open(require(path, "JSON file")) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(where = "file:line", record) per non-empty line; a malformed line gives a DataError as
    its record (so the caller can skip it and go on)."""
    with open(require(path, "JSON-lines file")) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: malformed JSON line ({e.msg})")


def read_tsv(path: Path) -> Iterator[tuple[str, dict]]:
    """(where = "file:line", {column: value}) per data row (line 1 is the header); a row with
    more cells than the header gives a DataError as its record."""
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's 128 KiB default
    with open(require(path, "TSV file"), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:  # more cells than the header has columns
                yield where, DataError(f"{where}: {len(row) - 1 + len(row[None])} cells, header has {len(row) - 1}")
            else:
                yield where, row


def read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    """(where = "file:row", {column: value}) per row, via pyarrow (optional dependency)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading parquet needs pyarrow, which is not installed "
            "(pip install pyarrow, or use the benchmark's original JSON/TSV files)"
        ) from None
    table = pq.read_table(require(path, "parquet file"))
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:{i}", row


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"}


def open_image(ref: Any, where: str):
    """A PIL RGB image from a path, raw bytes, a base64 str or a parquet {"bytes", "path"} struct."""
    from PIL import Image

    try:
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, Path) or (isinstance(ref, str) and Path(ref).suffix.lower() in _IMAGE_SUFFIXES):
            source: Any = require(Path(ref), "image")
        elif isinstance(ref, str):
            source = io.BytesIO(base64.b64decode(ref, validate=True))
        elif isinstance(ref, (bytes, bytearray)):
            source = io.BytesIO(ref)
        else:
            raise DataError(f"{where}: no image ({type(ref).__name__})")
        with Image.open(source) as image:
            return image.convert("RGB")
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    except Exception as e:  # PIL raises several types for truncated / unknown files
        raise DataError(f"{where}: image does not open ({type(e).__name__}: {e})") from None


def field_of(record: dict, name: str, where: str) -> Any:
    """record[name], or a DataError naming the row and the missing field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if name not in record or record[name] is None:
        raise DataError(f"{where}: missing field {name!r}")
    return record[name]
