"""vlm_prune.plot (matplotlib): the PNGs written, what the figures hold (a line with error bars
per method, the budgets as x ticks, the unpruned line, family colours, the Pareto front), the
eval report's plots, and the message when matplotlib is missing (a subprocess where importing
matplotlib really fails)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlm_prune import plot

# matplotlib (the `plot` extra) is installed by scripts/setup_env.sh: the tests that draw fail,
# rather than skip, without it; the ones at the end run where importing it fails on purpose

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = [8, 16, 36, 72]


def _series() -> list[plot.Series]:
    def s(name, ys):
        return plot.Series(name, BUDGETS, ys, [y - 0.03 for y in ys], [y + 0.03 for y in ys])

    return [s("cls_attention", [0.5, 0.7, 0.71, 0.9]), s("divprune", [0.6, 0.73, 0.76, 0.95]),
            s("fastv", [0.8, 0.91, 0.947, 0.97]), s("visionzip+transition", [0.55, 0.62, 0.7, 0.9])]


def _errorbars(ax) -> list:
    from matplotlib.container import ErrorbarContainer

    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_family_of_methods_strings_and_pipelines():
    assert plot.family("cls_attention") == plot.family("cdpruner") == plot.family("fopru") == "vision"
    assert plot.family("fastv") == plot.family("transition") == "llm"
    assert plot.family("visionzip+transition") == plot.family("visionzip:72+fastv:16:layer=1") == "pipeline"
    assert plot.family("cls_attention:36") == plot.family("dct (rescale=True)") == "vision"
    assert plot.family("unpruned") == plot.family("none") == "other"


def test_tokens_plot_writes_the_png_and_draws_one_errorbar_line_per_method(tmp_path):
    path = tmp_path / "sub" / "acc.png"
    fig = plot.tokens_plot(_series(), path, budgets=BUDGETS, reference=0.978, reference_interval=(0.967, 0.99),
                           title="t", size=(900, 500))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (900, 500)
        image.load()
    (ax,) = fig.axes
    bars = _errorbars(ax)
    assert len(bars) == 4  # one line with error bars per method
    assert [c.get_label() for c in bars] == ["cls_attention", "divprune", "fastv", "visionzip+transition"]
    for c in bars:
        line = c.lines[0]
        assert len(line.get_xdata()) == 4 and c.has_yerr
        # the intervals are drawn: the bar of each point spans low..high (0.06 here)
        segments = c.lines[2][0].get_segments()
        assert [round(seg[1][1] - seg[0][1], 6) for seg in segments] == [0.06] * 4
    assert list(ax.get_xticks()) == BUDGETS
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16", "36", "72"]
    assert ax.get_xscale() == "log"
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [0.978, 0.978]  # the unpruned line
    assert dashed[0].get_label().startswith("unpruned")
    # one colour family per stage: vision-stage blue, in-LLM red, pipelines green
    from matplotlib.colors import to_rgb

    colour = {c.get_label(): to_rgb(c.lines[0].get_color()) for c in bars}
    for name in ("cls_attention", "divprune"):
        r, g, b = colour[name]
        assert b > r and b > g, (name, colour[name])
    r, g, b = colour["fastv"]
    assert r > g and r > b
    r, g, b = colour["visionzip+transition"]
    assert g > r and g > b
    assert colour["cls_attention"] != colour["divprune"]  # shades within a family
    markers = {c.lines[0].get_marker() for c in bars}
    assert len(markers) == 4
    legend = ax.get_legend()
    assert "vision-stage: blue" in legend.get_title().get_text() and "in-LLM: red" in legend.get_title().get_text()


def test_tokens_plot_without_intervals_and_default_ticks(tmp_path):
    fig = plot.tokens_plot([plot.Series("pool", [36, 16], [0.56, 0.40])], tmp_path / "a.png", dodge=0)
    (ax,) = fig.axes
    (bar,) = _errorbars(ax)
    assert not bar.has_yerr
    assert list(ax.get_xticks()) == [16, 36]  # every x when no budgets are given
    assert list(bar.lines[0].get_xdata()) == [16, 36]  # sorted, not dodged
    assert not [line for line in ax.lines if line.get_linestyle() == "--"]  # no reference given


def test_pareto_front():
    P = plot.Point
    points = [P("a", 16, 10, 0.5), P("b", 16, 20, 0.9), P("c", 36, 30, 0.8), P("d", 8, 5, 0.4),
              P("e", 36, 20, 0.95), P("f", 72, 50, 0.95)]
    assert [p.name for p in plot.pareto_front(points)] == ["d", "a", "e"]
    assert plot.pareto_front([]) == []


def test_pareto_plot_points_front_and_reference(tmp_path):
    P = plot.Point
    points = [P("cls_attention", 16, 30.0, 0.70, 0.66, 0.74), P("cls_attention", 36, 45.0, 0.71, 0.68, 0.75),
              P("fastv", 16, 55.0, 0.91, 0.89, 0.93), P("cls_attention+fastv", 16, 40.0, 0.80, 0.77, 0.83)]
    reference = P("unpruned", None, 100.0, 0.978, 0.967, 0.99, family="other")
    fig = plot.pareto_plot(points, tmp_path / "p.png", reference=reference, xlabel="FLOPs %")
    with Image.open(tmp_path / "p.png") as image:
        assert image.size == (1100, 620)
    (ax,) = fig.axes
    bars = _errorbars(ax)
    assert [c.get_label() for c in bars] == ["cls_attention", "fastv", "cls_attention+fastv", "unpruned"]
    assert [len(c.lines[0].get_xdata()) for c in bars] == [2, 1, 1, 1]
    (front,) = [line for line in ax.lines if line.get_label() == "Pareto front"]
    assert list(front.get_xdata()) == [30.0, 40.0, 55.0, 100.0]  # @36 costs more and scores no better than +fastv
    labels = {t.get_text() for t in ax.texts}
    assert labels == {"cls_attention @16", "cls_attention+fastv @16", "fastv @16", "unpruned"}
    assert ax.get_xlabel() == "FLOPs %"


def test_panels_colour_a_method_alike_in_every_panel(tmp_path):
    import functools

    first = [plot.Series("cls_attention", [16], [0.7]), plot.Series("random", [16], [0.5])]
    second = [plot.Series("random", [16], [0.4])]
    names = ["cls_attention", "random"]
    fig = plot.panels([functools.partial(plot.tokens_axes, series=first, names=names),
                       functools.partial(plot.tokens_axes, series=second, names=names)], tmp_path / "two.png",
                      size_per_panel=(400, 300), legend_width=100)
    with Image.open(tmp_path / "two.png") as image:
        assert image.size == (900, 300)
    a, b = fig.axes
    colour = {(i, c.get_label()): c.lines[0].get_color() for i, ax in enumerate((a, b)) for c in _errorbars(ax)}
    assert colour[(0, "random")] == colour[(1, "random")]


# -- without matplotlib --------------------------------------------------------------------------------


def _without_matplotlib(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter where `import matplotlib` fails (sys.modules entry None)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed vlm_prune
    prelude = "import sys; sys.modules['matplotlib'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_without_matplotlib_the_plot_module_says_how_to_install_it(tmp_path):
    result = _without_matplotlib(
        "from vlm_prune import plot\n"
        "assert not plot.available()\n"
        "try:\n"
        "    plot.tokens_plot([plot.Series('a', [1], [1.0])], 'x.png')\n"
        "except ImportError as error:\n"
        "    assert isinstance(error, plot.MatplotlibMissing)\n"
        "    print(error)\n", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "plots need matplotlib: pip install 'vlm-prune[plot]'" == plot.MISSING
    assert not (tmp_path / "x.png").exists()


def test_demo_without_matplotlib_writes_the_tables_and_says_why_no_plots(tmp_path):
    out = tmp_path / "demo"
    result = _without_matplotlib(
        "from vlm_prune.cli import main\n"
        f"sys.exit(main(['demo', '-n', '20', '--threads', '1', '--method', 'random', '--budgets', '16', "
        f"'--timing-rounds', '0', '--out', {str(out)!r}]))\n", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert plot.MISSING in result.stderr
    assert {p.name for p in out.iterdir()} == {"demo.md", "demo.json"}
    assert "| random | 16 | 16 |" in (out / "demo.md").read_text()


def _summary(bench, method, keep, kept, gflops, score, options=None):
    return {"config": f"{method}-{keep}", "method": method, "keep": keep, "options": options or {}, "bench": bench,
            "primary": "accuracy", "score": score, "parsing": "official", "metrics": {"accuracy": score},
            "efficiency": {"visual_tokens": 576, "kept": kept, "prefill_ms": 1.0, "ttft_ms": 1.0, "tokens_per_s": 1.0,
                           "peak_mem_mib": 1.0, "prefill_gflops": gflops, "batch_size": 1},
            "n_items": 10, "n_answered": 10, "skipped": 0, "setup": {"model": "m"}}


def _write_summaries(out: Path) -> None:
    rows = [("pope", "none", 1.0, 576, 100.0, 86.0), ("pope", "cls_attention", 64, 64, 20.0, 80.0),
            ("pope", "cls_attention", 144, 144, 30.0, 84.0), ("pope", "fastv", 64, 64, 40.0, 85.0),
            ("pope", "visionzip:192+transition:64", None, 64, 25.0, 83.0),
            ("mme", "none", 1.0, 576, 100.0, 1500.0), ("mme", "cls_attention", 64, 64, 20.0, 1400.0)]
    for bench, method, keep, kept, gflops, score in rows:
        folder = out / f"{method}-{keep}".replace(":", "_").replace("+", "_") / bench
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(_summary(bench, method, keep, kept, gflops, score)))


def test_eval_report_plots_one_panel_per_benchmark(tmp_path):
    from vlm_prune.evals.report import write_report

    _write_summaries(tmp_path)
    report = write_report(tmp_path)
    assert report["png"] == tmp_path / "results.png" and report["pareto"] == tmp_path / "results_pareto.png"
    for key in ("png", "pareto"):
        with Image.open(report[key]) as image:
            assert image.format == "PNG" and image.size[0] > image.size[1]
    assert "visionzip:192+transition:64" in report["markdown"].read_text()  # a pipeline (keep None) is sorted


def test_eval_report_without_matplotlib_writes_the_tables(tmp_path):
    _write_summaries(tmp_path)
    result = _without_matplotlib(
        "from pathlib import Path\n"
        "from vlm_prune.evals.report import write_report\n"
        f"r = write_report(Path({str(tmp_path)!r}))\n"
        "assert r['png'] is None and r['pareto'] is None and r['markdown'].exists() and r['json'].exists()\n",
        tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert plot.MISSING in result.stderr
    assert not list(tmp_path.glob("*.png"))
