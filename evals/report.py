"""The end-of-run report over every summary in an output folder.

    paths = write_report(Path("out"))   # {"json": ..., "markdown": ..., "png": ... or None}

Reads out/*/*/summary.json (so a baseline run once and methods run later land in one table)
and writes out/results.json, out/results.md and out/results.png. Retention = a configuration's
headline score / the baseline's ("none") on the same benchmark and model, in percent; FLOPs
ratio = baseline prefill FLOPs / the configuration's (theoretical speed-up).
"""

from __future__ import annotations

import json
from pathlib import Path


def collect(out: Path) -> list[dict]:
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/summary.json"))]
    return sorted(summaries, key=lambda s: (s["bench"], s["method"] != "none", s["method"], -float(s["keep"])))


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


def plot(summaries: list[dict], path: Path) -> Path | None:
    """Score vs visual tokens kept, one panel per benchmark, one series per method. Without
    matplotlib: one Pillow-drawn PNG per benchmark (results_<bench>.png); returns the first."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_with_pillow(summaries, path)
    benches = sorted({s["bench"] for s in summaries})
    fig, axes = plt.subplots(1, len(benches), figsize=(4.5 * len(benches), 3.6), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        rows = [s for s in summaries if s["bench"] == bench and s["score"] is not None]
        for method in sorted({s["method"] for s in rows}):
            pts = sorted((s["efficiency"]["kept"], s["score"]) for s in rows if s["method"] == method)
            style = dict(marker="*", markersize=12, linestyle="none") if method == "none" else dict(marker="o")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method, **style)
        ax.set(title=bench, xlabel="visual tokens kept (mean)", ylabel=rows[0]["primary"] if rows else "score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_with_pillow(summaries: list[dict], path: Path) -> Path | None:
    from vlm_prune.plot import line_plot

    written = []
    for bench in sorted({s["bench"] for s in summaries}):
        rows = [s for s in summaries if s["bench"] == bench and s["score"] is not None]
        if not rows:
            continue
        series: dict[str, list[tuple[float, float]]] = {}
        for s in rows:
            series.setdefault(s["method"], []).append((s["efficiency"]["kept"], s["score"]))
        baseline = next((s["score"] for s in rows if s["method"] == "none"), None)
        written.append(line_plot(series, path.with_name(f"{path.stem}_{bench}.png"),
                                 f"{bench}: {rows[0]['primary']} vs visual tokens kept",
                                 "visual tokens kept (mean)", rows[0]["primary"], reference=baseline))
    return written[0] if written else None


def write_report(out: Path) -> dict:
    summaries = collect(out)
    add_retention(summaries)
    (out / "results.json").write_text(json.dumps({"results": summaries}, indent=1))
    (out / "results.md").write_text(markdown(summaries))
    png = plot(summaries, out / "results.png") if summaries else None
    return {"json": out / "results.json", "markdown": out / "results.md", "png": png, "summaries": summaries}
