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

Every annotation file a reader opens is noted while `recording_reads()` is active, so that
`fingerprint()` can hash exactly the files a benchmark's items came from (images excluded).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
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


def find_one(folder: Path, patterns: list[str], what: str, required: bool = True,
             official: list[str] = ()) -> Path | None:
    """The first of the `official` file names present in `folder`, else the single file matching
    the first pattern that matches anything (a folder that also holds a benchmark's train or OCR
    files still finds its evaluation file by its published name)."""
    require(folder, f"folder of {what}")
    for name in official:
        if (folder / name).is_file():
            return folder / name
    for pattern in patterns:
        hits = sorted(folder.glob(pattern))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            names = ", ".join(h.name for h in hits)
            expected = f" (looked first for {', '.join(official)})" if official else ""
            raise DataError(f"{folder}: several files match {pattern!r} ({names}){expected}; keep one {what}")
    if required:
        raise DataError(f"{folder}: no {what} (looked for {', '.join([*official, *patterns])})")
    return None


# ------------------------------------------------------------------ files read, fingerprint

_reads: list[Path] | None = None


@contextlib.contextmanager
def recording_reads() -> Iterator[list[Path]]:
    """Collects the path of every file the readers below open inside the `with` block."""
    global _reads
    outer, _reads = _reads, []
    try:
        yield _reads
    finally:
        _reads = outer


def note_read(path: Path) -> Path:
    """Records `path` as read (for the fingerprint) if recording; returns it."""
    if _reads is not None:
        _reads.append(Path(path))
    return path


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(files: list[Path], root: Path) -> dict[str, str]:
    """{top-level file or folder under `root`: 16 hex digits of the SHA-256 of the content of the
    files read there}. Keyed per top-level entry so that reading more of the folder later (a
    further POPE split) adds keys instead of changing one; a changed key means changed data."""
    parts: dict[str, list[str]] = {}
    for path in sorted(set(files)):
        try:
            rel = path.resolve().relative_to(root.resolve())
            key = rel.parts[0]
        except ValueError:  # outside the benchmark's folder: keyed by its whole path
            rel = path
            key = str(path)
        parts.setdefault(key, []).append(f"{rel.as_posix()}\0{file_hash(path)}\n")
    return {key: hashlib.sha256("".join(lines).encode()).hexdigest()[:16] for key, lines in sorted(parts.items())}


def read_json(path: Path) -> Any:
    try:
        with open(note_read(require(path, "JSON file")), encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(where = "file:line", record) per non-empty line; a malformed line gives a DataError as
    its record (so the caller can skip it and go on)."""
    with open(note_read(require(path, "JSON-lines file")), "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    yield where, json.loads(line)
            except UnicodeDecodeError:
                yield where, DataError(f"{where}: not UTF-8 text")
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: malformed JSON line ({e.msg})")


def read_tsv(path: Path) -> Iterator[tuple[str, dict]]:
    """(where = "file:line", {column: value}) per data row (line 1 is the header); a row with
    more cells than the header gives a DataError as its record."""
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's 128 KiB default
    with open(note_read(require(path, "TSV file")), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:  # more cells than the header has columns
                    yield where, DataError(f"{where}: {len(row) - 1 + len(row[None])} cells, header has {len(row) - 1}")
                else:
                    yield where, row
        except (UnicodeDecodeError, csv.Error) as e:  # the rest of the file cannot be read
            raise DataError(f"{path}:{reader.line_num + 1}: unreadable ({type(e).__name__}: {e})") from None


def read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    """(where = "file:row", {column: value}) per row, via pyarrow (optional dependency)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading parquet needs pyarrow, which is not installed "
            "(pip install pyarrow, or use the benchmark's original JSON/TSV files)"
        ) from None
    try:
        table = pq.read_table(note_read(require(path, "parquet file")))
    except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError, ...) for a damaged file
        raise DataError(f"{path}: unreadable parquet ({type(e).__name__}: {e})") from None
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


def list_field(record: dict, name: str, where: str) -> list:
    """record[name] if it is a list, else a DataError naming the row and the field."""
    value = field_of(record, name, where)
    if not isinstance(value, list):
        raise DataError(f"{where}: field {name!r} should be a list, got {type(value).__name__}")
    return value
