"""predictions.jsonl: one JSON object per answered item, appended and flushed as produced.

    store = PredictionStore(Path("out/cls_attention-64/pope/predictions.jsonl"))
    store.done            # {item id, ...} already answered (a re-run skips them)
    store.append({"id": "random/1", "prediction": "yes", ...})   # written + flushed at once
    store.records()       # every record, file order

Each line is written with one write() and flushed, so an interrupted run (Ctrl-C, a crash, a
kill) loses at most the line being written; a partial last line is cut off when the file is
opened again. A malformed line anywhere else is a DataError naming it (the file was edited).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .data import DataError


class PredictionStore:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._records = self._read()
        self.done = {r["id"] for r in self._records}
        self._f = open(path, "a", encoding="utf-8")

    def _repair(self) -> None:
        """Cuts a last line without its newline (the write an interruption cut short)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{self.path}:{lineno}: malformed prediction line ({e.msg}); "
                                    "delete the line to re-run that item") from None
                if not isinstance(record, dict) or "id" not in record:
                    raise DataError(f"{self.path}:{lineno}: a prediction line without an item id; "
                                    "delete the line to re-run that item")
                records.append(record)
        return records

    def append(self, record: dict) -> None:
        if record["id"] in self.done:  # never two answers for one item
            return
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        self.done.add(record["id"])
        self._records.append(record)

    def records(self) -> list[dict]:
        return list(self._records)

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self) -> "PredictionStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
