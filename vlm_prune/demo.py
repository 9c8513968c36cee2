"""`vlm-prune demo`: every method at two budgets on the bundled fixture model.

The fixture (vlm_prune/fixture_model) is a small LLaVA-architecture model trained by the
project on a synthetic VQA task whose answers depend on small image regions (colours, shapes,
counts, positions of a few objects), so choosing the wrong tokens loses answers. The demo scores
the unpruned model and each method at 25% and ~11% of the 144 visual tokens on the seeded test
split: accuracy with a 95% bootstrap interval, retention vs unpruned, tokens kept and prefill
speed-up (model forward time, same process, threads pinned); it writes a Markdown table, a JSON
file and a PNG plot of accuracy vs visual tokens kept.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import api
from .registry import get_method

BUDGETS = [36, 16]  # of 144 visual tokens: 25% and 11%
METHODS = ["cls_attention", "visionzip", "divprune", "dct", "text_recovery", "transition", "fastv", "pool", "random"]
OPTIONS = {"fastv": {"layer": 1}}  # the fixture LLM has 3 layers: FastV's K=2 of 32 scaled down
# `--variants`: the named departures from the releases, scored beside the defaults
VARIANTS = [
    ("dct", {"rescale": True}),
    ("text_recovery", {"mode": "fixed"}),
    ("text_recovery", {"score": "fastervlm"}),
    ("visionzip", {"layout": "raster"}),
    ("transition", {"iga_layer": "own", "ttv_softmax": "visual"}),
]


def bootstrap_interval(correct: list[bool], samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `correct`."""
    values = np.asarray(correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _score(model, processor, items, batch_size: int) -> tuple[dict, float]:
    from .fixture import evaluate

    start = time.perf_counter()
    result = evaluate(model, processor, items, batch_size=batch_size)
    return result, time.perf_counter() - start


def label(method: str, options: dict) -> str:
    """"dct" or "dct (rescale=True)": a row's name."""
    return method + (" (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else "")


def _takes_positions(method: str) -> bool:
    cls = get_method(method)
    return cls.stage == "vision" or bool(getattr(cls, "position_policies", ()))


def run(threads: int = 2, n: int = 600, batch_size: int = 50, out: str | Path = "demo-results",
        methods: list[str] | None = None, budgets: list[int] | None = None, positions: str | None = None,
        variants: bool = False) -> list[dict]:
    """`positions` ("renumber" / "original"; None = each method's default: renumber on this
    LLaVA) applies to the methods that take it (the vision-stage ones and `transition`);
    `variants`: also score the named departures from the releases (`VARIANTS`)."""
    from vlm_prune.evals.synthetic_vqa import make_split

    from .fixture import load

    methods, budgets, out = methods or METHODS, budgets or BUDGETS, Path(out)
    torch.set_num_threads(threads)
    model, processor = load()
    items = make_split("test", n)
    chosen = [(m, {}) for m in methods] + [v for v in VARIANTS if v[0] in methods] * variants
    configs = [("unpruned", {}, None)] + [(m, o, k) for m, o in chosen for k in budgets]
    rows = []
    with torch.inference_mode(), tqdm(total=len(configs), desc="demo", unit="config") as bar:
        for method, options, keep in configs:
            extra = {"positions": positions} if positions and keep and _takes_positions(method) else {}
            handle = api.patch(model, method, keep, **extra, **OPTIONS.get(method, {}), **options) if keep else None
            result, seconds = _score(model, processor, items, batch_size)
            kept = 144 if handle is None else sum(s["kept"] for s in handle.stats) / len(handle.stats)
            api.unpatch(model)
            low, high = bootstrap_interval(result["correct"])
            rows.append(dict(method=label(method, options), keep=keep or 144, positions=extra.get("positions", "default"),
                             kept=round(kept, 1), accuracy=result["accuracy"], ci95=[low, high], seconds=seconds,
                             per_qtype=result["per_qtype"]))
            bar.update()
    base = rows[0]
    for row in rows:
        row["retention"] = row["accuracy"] / base["accuracy"]
        row["speedup"] = base["seconds"] / row["seconds"]
    _report(rows, out, n, threads, positions)
    return rows


def _report(rows: list[dict], out: Path, n: int, threads: int, positions: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    policy = f", vision-stage positions={positions}" if positions else ""
    lines = [f"vlm_prune demo: fixture LLaVA (144 visual tokens), synthetic VQA test split, n={n}, "
             f"{threads} thread(s){policy}", "",
             "| method | keep | tokens kept | accuracy (95% CI) | retention | prefill speed-up |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['keep']} | {r['kept']:g} | {100 * r['accuracy']:.1f} "
                     f"({100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f}) | {100 * r['retention']:.1f}% | "
                     f"{r['speedup']:.2f}x |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "demo.md").write_text(table + "\n")
    (out / "demo.json").write_text(json.dumps(rows, indent=2))
    from .plot import line_plot

    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows[1:]:  # every line ends at the unpruned model (144 tokens)
        series.setdefault(r["method"], [(rows[0]["kept"], rows[0]["accuracy"])]).append((r["kept"], r["accuracy"]))
    png = line_plot(series, out / "accuracy_vs_tokens.png", "fixture LLaVA, synthetic VQA: accuracy vs visual tokens kept",
                    "visual tokens kept (of 144)", "accuracy", reference=rows[0]["accuracy"])
    print(f"\nwrote {out / 'demo.md'}, {out / 'demo.json'}, {png} (dashed line: unpruned)")
    print('Try it on your model:  handle = vlm_prune.patch(model, method="cls_attention", keep=64)')
