"""Running one configuration on one benchmark: predictions as they come, then the summary.

    summary = run_benchmark(backend, task, config, items, out=Path("out"), batch_size=4)

Writes, under out/<config.name>/<task.name>/:
    setup.json         what the predictions depend on (model, prompt suffix, max tokens, options,
                       and "data": the fingerprint of the benchmark's files); a re-run with a
                       different setup, or on changed data, into the same folder is refused
    predictions.jsonl  one line per answered item (see store.py), resumed by item id
    skipped.jsonl      {"id", "error"} of items skipped under on_error="skip" in the last run
    summary.json       the metrics and the efficiency numbers (see `summarize`)
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from .backend import Backend, Request
from .configs import Config
from .data import DataError, Item, open_image
from .store import PredictionStore
from .tasks import Task


def _read_setup(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable ({e.msg}); delete the folder to start over, or use another --out") from None


def _checked_setup(path: Path, setup: dict) -> dict:
    """`setup` with the data fingerprint merged into the one stored at `path`; ValueError if the
    predictions there were made with another setup or on data files that have changed since."""
    old = _read_setup(path)
    if not old:
        return setup
    diff = {k: (old.get(k), v) for k, v in setup.items() if k != "data" and old.get(k) != v}
    if diff:
        raise ValueError(f"{path}: predictions there were made with a different setup "
                         f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); use another --out")
    before, now = old.get("data") or {}, setup.get("data") or {}
    changed = [k for k in now if k in before and before[k] != now[k]]
    if changed:
        raise ValueError(f"{path.parent}: the data changed since the predictions there were made "
                         f"({', '.join(f'{k}: {before[k]} -> {now[k]}' for k in changed)}); their stored targets "
                         f"are stale. Use another --out, or delete {path.parent} to start over")
    return {**setup, "data": {**before, **now}}  # files read only now (a further POPE split) join


def _check_stored(folder: Path, items: list[Item], records: list[dict]) -> None:
    """ValueError if an answered item's stored target or question differs from the data's now
    (stale predictions, also for runs recorded before the fingerprint existed)."""
    stored = {r["id"]: r for r in records}
    stale = [it for it in items if it.id in stored
             and (stored[it.id].get("target") != it.target or stored[it.id].get("question") != it.question)]
    if stale:
        raise ValueError(f"{folder}: {len(stale)} answered item(s) have another target or question in the data "
                         f"now (first: {stale[0].id} at {stale[0].where}); the predictions there are stale. "
                         f"Use another --out, or delete {folder} to start over")


def _requests(batch: list[Item], suffix: str, max_new_tokens: int, on_error: str, skipped: list) -> tuple[list, list]:
    """(requests, their items) for the items whose image opens; the others raise or are skipped."""
    reqs, ok = [], []
    for item in batch:
        try:
            image = open_image(item.image, item.where)
        except DataError as e:
            if on_error == "raise":
                raise
            skipped.append({"id": item.id, "error": str(e)})
            continue
        text = f"{item.question}\n{suffix}" if suffix else item.question
        reqs.append(Request(item.id, image, text, max_new_tokens))
        ok.append(item)
    return reqs, ok


def run_benchmark(backend: Backend, task: Task, config: Config, items: list[Item], out: Path,
                  batch_size: int = 1, suffix: str | None = None, max_new_tokens: int | None = None,
                  on_error: str = "raise", load_errors: list[str] | None = None, progress: bool = True,
                  data_fingerprint: dict | None = None, lenient: bool = False) -> dict:
    """Answers every item not yet in predictions.jsonl, then scores all of `items`; the summary.
    `data_fingerprint` (tasks.load_bench) is recorded in setup.json and checked on a re-run;
    `lenient` scores with the non-official readers (metrics.py)."""
    folder = out / config.name / task.name
    folder.mkdir(parents=True, exist_ok=True)
    suffix = task.suffix if suffix is None else suffix
    max_new_tokens = max_new_tokens or task.max_new_tokens
    setup = {**backend.describe(), "config": config.to_dict(), "bench": task.name,
             "prompt_suffix": suffix, "max_new_tokens": max_new_tokens}
    if data_fingerprint is not None:
        setup["data"] = data_fingerprint
    setup = _checked_setup(folder / "setup.json", setup)
    skipped = [{"id": None, "error": e} for e in load_errors or []]
    with PredictionStore(folder / "predictions.jsonl") as store:
        _check_stored(folder, items, store.records())
        (folder / "setup.json").write_text(json.dumps(setup, indent=1))
        todo = [it for it in items if it.id not in store.done]
        bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="item", disable=not progress,
                   desc=f"{config.name}/{task.name}", dynamic_ncols=True)
        try:
            if todo:
                backend.configure(config.method, config.keep, config.options)
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                reqs, ok = _requests(batch, suffix, max_new_tokens, on_error, skipped)
                preds = backend.generate(reqs) if reqs else []
                for item, pred in zip(ok, preds):
                    store.append({**pred.to_dict(), "target": item.target, "group": item.group,
                                  "meta": item.meta, "question": item.question, "where": item.where})
                bar.update(len(batch))
        finally:
            bar.close()
            with open(folder / "skipped.jsonl", "w") as f:
                f.writelines(json.dumps(s) + "\n" for s in skipped)
        records = store.records()
    summary = summarize(task, config, items, records, setup, len(skipped), lenient)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarize(task: Task, config: Config, items: list[Item], records: list[dict], setup: dict, skipped: int,
              lenient: bool = False) -> dict:
    """{"config", "bench", "primary", "score", "parsing", "metrics", "efficiency", "n_items",
    "n_answered", "skipped", "setup"}. primary = the headline key (Task.headline), parsing =
    "official" or "lenient". Efficiency: means over answered items of visual tokens in / kept and
    of prefill FLOPs; batch latencies (prefill_ms, ttft_ms) averaged over items; decode
    tokens_per_s = generated tokens after the first / decode time, summed over batches; peak memory = max."""
    ids = {it.id for it in items}
    rs = [r for r in records if r["id"] in ids]
    metrics = task.metric(rs, lenient=lenient) if rs else {}
    primary = task.headline(metrics)
    n = len(rs) or 1
    decode_time = sum(r["decode_s"] / r["batch_size"] for r in rs)  # each batch counted once
    efficiency = {
        "visual_tokens": sum(r["visual_tokens"] for r in rs) / n,
        "kept": sum(r["kept"] for r in rs) / n,
        "prefill_ms": 1e3 * sum(r["prefill_s"] for r in rs) / n,
        "ttft_ms": 1e3 * sum(r["ttft_s"] for r in rs) / n,
        "tokens_per_s": sum(max(r["new_tokens"] - 1, 0) for r in rs) / decode_time if decode_time else 0.0,
        "peak_mem_mib": max((r["peak_mem_bytes"] for r in rs), default=0) / 2**20,
        "prefill_gflops": sum(r["prefill_flops"] for r in rs) / n / 1e9,
        "batch_size": max((r["batch_size"] for r in rs), default=0),
    }
    return {"config": config.name, **config.to_dict(), "bench": task.name, "primary": primary,
            "score": metrics.get(primary), "parsing": "lenient" if lenient else "official",
            "metrics": metrics, "efficiency": efficiency,
            "n_items": len(items), "n_answered": len(rs), "skipped": skipped, "setup": setup}
