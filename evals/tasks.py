"""The benchmarks, as data: where each one's files are, how it is asked and how it is scored.

    task = TASKS["pope"]
    items, errors = load_items(task, Path("data"), on_error="skip", limit=100)
    bench = load_bench(task, Path("data"))   # .items, .errors, .fingerprint (of the files read)

`--data DIR` holds one sub-folder per benchmark, named as `Task.folder` (DIR/pope/, DIR/mme/...);
DIR itself is used when that sub-folder does not exist (a single benchmark). The folder layout
of each benchmark is in the docstring of its loader module and in evals/README.md.

Prompt suffixes are LLaVA-1.5's evaluation ones (also lmms-eval's): SHORT for short-answer and
yes/no sets, MC for multiple choice; `--prompt-suffix` overrides them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from . import metrics
from .data import DataError, Item, fingerprint, recording_reads, require
from .loaders_mc import load_mmbench, load_scienceqa
from .loaders_vqa import load_gqa, load_textvqa, load_vqav2
from .loaders_yesno import load_mme, load_pope

SHORT = "Answer the question using a single word or phrase."
MC = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Task:
    name: str
    folder: str  # default sub-folder of --data
    load: Callable[[Path, dict], Iterator[Item | DataError]]
    suffix: str  # appended to the question on its own line
    metric: Callable[..., dict]  # metric(records, lenient=False) -> {name: value}
    primary: str  # the metric key shown in tables and plots
    max_new_tokens: int = 16
    prefer: str | None = None  # the headline instead of `primary` whenever the metrics have it

    def headline(self, values: dict) -> str:
        """The key of the headline score among `values` (a metric's output)."""
        return self.prefer if self.prefer in values else self.primary


TASKS = {t.name: t for t in [
    Task("vqav2", "vqav2", load_vqav2, SHORT, metrics.vqav2_metric, "accuracy"),
    Task("gqa", "gqa", load_gqa, SHORT, metrics.gqa_metric, "accuracy"),
    Task("textvqa", "textvqa", load_textvqa, SHORT, metrics.textvqa_metric, "accuracy"),
    Task("pope", "pope", load_pope, SHORT, metrics.pope_metric, "f1", max_new_tokens=8),
    Task("mme", "mme", load_mme, SHORT, metrics.mme_metric, "perception", max_new_tokens=8),
    Task("scienceqa_img", "scienceqa", load_scienceqa, MC, metrics.sqa_metric, "accuracy", max_new_tokens=8),
    # circular accuracy is MMBench's published number: the headline whenever rotations were asked
    Task("mmbench", "mmbench", load_mmbench, MC, metrics.mmbench_metric, "accuracy", max_new_tokens=8,
         prefer="circular_accuracy"),
]}
ALIASES = {"sqa": "scienceqa_img", "scienceqa": "scienceqa_img", "sqa_img": "scienceqa_img", "vqa": "vqav2"}


def get_task(name: str) -> Task:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[key]


def task_root(task: Task, data: Path) -> Path:
    sub = data / task.folder
    return sub if sub.is_dir() else require(data, f"--data folder for {task.name}")


def _limit(items: list[Item], limit: int | None) -> list[Item]:
    """The first `limit` groups (an MME image pair, an MMBench question with its rotations) of
    each split (POPE: per split), in file order."""
    if limit is None:
        return items
    kept: dict[object, set[str]] = {}
    out = []
    for item in items:
        groups = kept.setdefault(item.meta.get("split"), set())
        if item.group not in groups:
            if len(groups) >= limit:
                continue
            groups.add(item.group)
        out.append(item)
    return out


class Bench(NamedTuple):
    items: list[Item]
    errors: list[str]  # rows skipped under on_error="skip"
    fingerprint: dict[str, str]  # data.fingerprint of the annotation files read (not the images)


def load_bench(task: Task, data: Path, options: dict | None = None, on_error: str = "raise",
               limit: int | None = None) -> Bench:
    """The benchmark's items. on_error="raise": the first bad row raises its DataError; "skip":
    bad rows are left out and their messages returned. Missing top-level files always raise."""
    items, errors, seen = [], [], set()
    root = task_root(task, data)
    with recording_reads() as files:
        for made in task.load(root, options or {}):
            if isinstance(made, Item) and made.id in seen:
                made = DataError(f"{made.where}: duplicate item id {made.id!r}")
            if isinstance(made, DataError):
                if on_error == "raise":
                    raise made
                errors.append(str(made))
                continue
            seen.add(made.id)
            items.append(made)
    return Bench(_limit(items, limit), errors, fingerprint(files, root))


def load_items(task: Task, data: Path, options: dict | None = None, on_error: str = "raise",
               limit: int | None = None) -> tuple[list[Item], list[str]]:
    """(items, skipped-row messages): load_bench without the fingerprint."""
    bench = load_bench(task, data, options, on_error, limit)
    return bench.items, bench.errors
