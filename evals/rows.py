"""Turning raw benchmark rows into Items, one row at a time, so one bad row is one error.

Loaders are generators of `Item | DataError`: a row that cannot be converted yields the
DataError (naming file and row) instead of stopping the whole file; `tasks.load_items` then
raises it or counts it per `--on-error`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

from .data import DataError, Item

Rows = Iterable[tuple[str, object]]  # (where = "file:row", record or a DataError from the reader)


def convert(rows: Rows, make: Callable[[str, dict], Item | list[Item]]) -> Iterator[Item | DataError]:
    """make(where, record) per row; its KeyError/TypeError/ValueError/DataError become a DataError."""
    for where, record in rows:
        if isinstance(record, DataError):
            yield record
            continue
        try:
            made = make(where, record)
        except DataError as e:
            yield e if str(e).startswith(where) else DataError(f"{where}: {e}")
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            yield DataError(f"{where}: malformed row ({type(e).__name__}: {e})")
        else:
            yield from (made if isinstance(made, list) else [made])


def parquet_files(folder: Path) -> list[Path]:
    """The parquet shards of an lmms-eval / HF dataset export under `folder` (any depth), sorted."""
    return sorted(folder.rglob("*.parquet")) if folder.is_dir() else []


def parquet_rows(files: list[Path]) -> Rows:
    from .data import read_parquet

    for f in files:
        yield from read_parquet(f)


def image_folder(root: Path, candidates: list[str]) -> Path:
    """The first existing candidate sub-folder of `root` (else the first, for the error message)."""
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    return root / candidates[0]
