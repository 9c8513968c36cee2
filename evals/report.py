"""The end-of-run report over every summary in an output folder.

    paths = write_report(Path("out"))   # {"json", "markdown", "png", "pareto" (None without matplotlib), "summaries"}

Reads out/*/*/summary.json (so a baseline run once and methods run later land in one table)
and writes out/results.json, out/results.md, out/results.png (score vs visual tokens kept) and
out/results_pareto.png (score vs prefill FLOPs; the plots need matplotlib, the `plot` extra).
Retention = a configuration's headline score / the baseline's ("none") on the same benchmark and
model, in percent; FLOPs ratio = baseline prefill FLOPs / the configuration's (theoretical
speed-up).
"""

from __future__ import annotations

import json
from pathlib import Path


def collect(out: Path) -> list[dict]:
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/summary.json"))]
    # a pipeline's keep is None (its string holds each stage's keep)
    return sorted(summaries, key=lambda s: (s["bench"], s["method"] != "none", s["method"],
                                            -float(s["keep"] if s["keep"] is not None else 0)))


def _baseline(s: dict, summaries: list[dict]) -> dict | None:
    """The "none" summary of the same benchmark and model, scored the same way (same headline
    key, e.g. MMBench circular or not, and same answer parsing)."""
    model = s["setup"].get("model")
    return next((b for b in summaries if b["method"] == "none" and b["bench"] == s["bench"]
                 and b["setup"].get("model") == model and b["primary"] == s["primary"]
                 and b.get("parsing", "official") == s.get("parsing", "official")), None)


def add_retention(summaries: list[dict]) -> None:
    """Sets s["retention"] (%) and s["flops_ratio"] where a baseline exists, else None."""
    for s in summaries:
        b = _baseline(s, summaries)
        s["retention"] = s["flops_ratio"] = None
        if b is None:
            continue
        if s["score"] is not None and b["score"]:
            s["retention"] = 100.0 * s["score"] / b["score"]
        if s["efficiency"]["prefill_gflops"]:
            s["flops_ratio"] = b["efficiency"]["prefill_gflops"] / s["efficiency"]["prefill_gflops"]


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(summaries: list[dict]) -> str:
    head = ("| bench | config | n | score | retention % | visual tokens in -> kept | prefill ms | TTFT ms "
            "| decode tok/s | peak MiB | prefill GFLOPs | FLOPs speed-up |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        e = s["efficiency"]
        lines.append(
            f"| {s['bench']} | {s['config']} | {s['n_answered']}/{s['n_items']} | {s['primary']} {_fmt(s['score'], '.2f')} "
            f"| {_fmt(s['retention'])} | {e['visual_tokens']:.0f} -> {e['kept']:.0f} | {e['prefill_ms']:.1f} "
            f"| {e['ttft_ms']:.1f} | {e['tokens_per_s']:.1f} | {e['peak_mem_mib']:.0f} | {e['prefill_gflops']:.3g} "
            f"| {_fmt(s['flops_ratio'], '.2f')}x |")
    details = ["", "Metrics:", ""]
    for s in summaries:
        top = {k: v for k, v in s["metrics"].items() if "/" not in k}
        details.append(f"- {s['bench']} / {s['config']}: " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in top.items())
            + (f" (skipped {s['skipped']})" if s["skipped"] else "")
            + (" (lenient parsing: not comparable with published numbers)" if s.get("parsing") == "lenient" else ""))
    return "\n".join(lines + details) + "\n"


def _method_name(s: dict) -> str:
    """A series name: the method (a pipeline: its string less the keeps), with its options."""
    if s["keep"] is None:  # a pipeline: "visionzip:192+transition:64:alpha=0.5" -> "visionzip+transition (alpha=0.5)"
        from vlm_prune.pipeline_config import parse_stages

        return "+".join(name + (" (" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")" if opts else "")
                        for name, _, opts in parse_stages(s["method"]))
    opts = s.get("options") or {}
    return s["method"] + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) + ")" if opts else "")


def plot(summaries: list[dict], path: Path) -> dict[str, Path | None]:
    """Two PNGs (vlm_prune.plot, matplotlib): `path` -- score vs visual tokens kept, one panel
    per benchmark, one line per method (and options), the baseline ("none") dashed; and
    <stem>_pareto.png -- score vs prefill GFLOPs per benchmark with the Pareto front. Without
    matplotlib: prints how to install it (stderr) and returns None for both."""
    import functools
    import sys

    from vlm_prune.plot import MatplotlibMissing, Point, Series, panels, pareto_axes, tokens_axes

    benches = sorted({s["bench"] for s in summaries if s["score"] is not None})
    names = sorted({_method_name(s) for s in summaries if s["method"] != "none"})
    tokens, pareto = [], []
    for bench in benches:
        rows = [s for s in summaries if s["bench"] == bench and s["score"] is not None]
        base = next((s for s in rows if s["method"] == "none"), None)
        series: dict[str, Series] = {}
        for s in sorted((s for s in rows if s["method"] != "none"), key=lambda s: s["efficiency"]["kept"]):
            entry = series.setdefault(_method_name(s), Series(_method_name(s), [], []))
            entry.x.append(s["efficiency"]["kept"])
            entry.y.append(s["score"])
        ylabel = rows[0]["primary"]
        tokens.append(functools.partial(
            tokens_axes, series=list(series.values()), reference=None if base is None else base["score"],
            reference_name="none (unpruned)", title=bench, xlabel="visual tokens kept (mean)", ylabel=ylabel,
            legend=bench == benches[-1], names=names))
        points = [Point(_method_name(s), s["efficiency"]["kept"], s["efficiency"]["prefill_gflops"], s["score"])
                  for s in rows if s["method"] != "none" and s["efficiency"]["prefill_gflops"]]
        reference = (None if base is None or not base["efficiency"]["prefill_gflops"] else
                     Point("none (unpruned)", None, base["efficiency"]["prefill_gflops"], base["score"], family="other"))
        pareto.append(functools.partial(pareto_axes, points=points, reference=reference, title=bench,
                                        xlabel="prefill GFLOPs (theoretical, per item)", ylabel=ylabel,
                                        legend=bench == benches[-1], names=names))
    if not benches:
        return {"png": None, "pareto": None}
    pareto_path = path.with_name(f"{path.stem}_pareto.png")
    try:
        panels(tokens, path)
        panels(pareto, pareto_path)
    except MatplotlibMissing as error:
        print(f"{error} (the results JSON and Markdown are written; the plots are not)", file=sys.stderr)
        return {"png": None, "pareto": None}
    return {"png": path, "pareto": pareto_path}


def write_report(out: Path) -> dict:
    summaries = collect(out)
    add_retention(summaries)
    (out / "results.json").write_text(json.dumps({"results": summaries}, indent=1))
    (out / "results.md").write_text(markdown(summaries))
    pngs = plot(summaries, out / "results.png") if summaries else {"png": None, "pareto": None}
    return {"json": out / "results.json", "markdown": out / "results.md", **pngs, "summaries": summaries}
