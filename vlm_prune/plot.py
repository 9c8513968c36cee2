"""Plots of pruning results with matplotlib (the optional extra: ``pip install 'vlm-prune[plot]'``).

    from vlm_prune.plot import Series, tokens_plot, pareto_plot
    fig = tokens_plot([Series("cls_attention", x=[16, 36], y=[0.70, 0.71], low=[...], high=[...])],
                      "accuracy_vs_tokens.png", budgets=[16, 36], reference=0.978)
    fig = pareto_plot([Point("cls_attention", 36, cost=0.31, y=0.71)], "pareto.png", reference=...)

`tokens_plot`: score vs visual tokens kept, one line per series with its interval as error bars,
x ticks at the budgets measured (log-2 axis), the unpruned score as a dashed line (its interval
shaded). `pareto_plot`: score vs a cost (prefill FLOPs, or a time), one point per configuration,
the Pareto front (no cheaper configuration scores higher) drawn through the points that make it.
Colours: one per method family -- vision-stage methods blue, in-LLM methods red, pipelines
green (shades within a family, one marker per method); `family()` tells a method's.
`tokens_axes` / `pareto_axes` draw the same on a given Axes, `panels` puts several side by side
(`vlm-prune eval`: one per benchmark).

Both draw on a `matplotlib.figure.Figure` rendered by the Agg canvas (no pyplot, no global
backend switch, no display needed), write a PNG of a fixed size (`size` pixels at `DPI`) and
return the Figure, so callers and tests can read its Axes. Without matplotlib they raise
`MatplotlibMissing` (an ImportError) whose message says how to install it (`MISSING`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

MISSING = "plots need matplotlib: pip install 'vlm-prune[plot]'"
DPI = 100
FAMILIES = {  # family -> (legend name, colour, colour map of its shades)
    "vision": ("vision-stage", "blue", "Blues"),
    "llm": ("in-LLM", "red", "Reds"),
    "pipeline": ("pipeline", "green", "Greens"),
    "other": ("other", "grey", "Greys"),
}
MARKERS = "osD^vP*Xh<>p"


class MatplotlibMissing(ImportError):
    """matplotlib is not installed; str(error) is `MISSING`."""


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MatplotlibMissing(MISSING) from error
    return matplotlib, Figure, FigureCanvasAgg


def available() -> bool:
    """Whether matplotlib can be imported (the plots can be drawn)."""
    try:
        _matplotlib()
    except MatplotlibMissing:
        return False
    return True


def family(method: str) -> str:
    """"vision", "llm", "pipeline" (stages joined by '+'), or "other" (the baseline, an unknown
    name) -- of a method name or a configuration string ("cls_attention:36:layers=[-2]")."""
    from .registry import get_method

    if "+" in method:
        return "pipeline"
    name = method.split(":", 1)[0].split(" ", 1)[0].strip()
    try:
        return "llm" if get_method(name).stage == "llm" else "vision"
    except (KeyError, ValueError):
        return "other"


@dataclass
class Series:
    """One method's line: y at x, with an optional interval [low, high] per point."""

    name: str
    x: Sequence[float]
    y: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    family: str | None = None  # None: family(name)


@dataclass
class Point:
    """One configuration of a Pareto plot: its cost (x) and score (y), optional interval."""

    name: str
    budget: float | None
    cost: float
    y: float
    low: float | None = None
    high: float | None = None
    family: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.budget is None else f"{self.name} @{self.budget:g}"


@dataclass
class _Style:
    colours: dict[str, Any] = field(default_factory=dict)
    markers: dict[str, str] = field(default_factory=dict)


def _styles(names_by_family: dict[str, list[str]]) -> _Style:
    """A shade of its family's colour map and a marker for every name."""
    matplotlib, _, _ = _matplotlib()
    style = _Style()
    i = 0
    for fam, names in names_by_family.items():
        cmap = matplotlib.colormaps[FAMILIES.get(fam, FAMILIES["other"])[2]]
        for j, name in enumerate(names):
            shade = 0.85 if len(names) == 1 else 0.95 - 0.6 * j / (len(names) - 1)  # dark to light
            style.colours[name] = cmap(shade)
            style.markers[name] = MARKERS[i % len(MARKERS)]
            i += 1
    return style


def _by_family(items: Sequence[Any], names: Sequence[str] = ()) -> dict[str, list[str]]:
    """{family: names} of the items (and of `names`, so that panels of one figure colour a
    method alike even where one of them lacks it), families in `FAMILIES` order."""
    given = {item.name: item.family for item in items}
    out: dict[str, list[str]] = {}
    for name in dict.fromkeys([*names, *given]):  # `names` first: the same order in every panel
        out.setdefault(given.get(name) or family(name), []).append(name)
    order = list(FAMILIES)
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _figure(size: tuple[int, int]) -> Any:
    _, Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")  # the figure's own size: no "tight" cropping


def _reference(ax: Any, reference: float | None, interval: Sequence[float] | None, name: str) -> None:
    if reference is None:
        return
    ax.axhline(reference, color="0.3", linestyle="--", linewidth=1.2, label=f"{name} ({reference:.3g})", zorder=1)
    if interval is not None:
        ax.axhspan(interval[0], interval[1], color="0.5", alpha=0.12, linewidth=0, zorder=0)


def _legend(ax: Any, names_by_family: dict[str, list[str]], fontsize: float = 8) -> None:
    title = " · ".join("{}: {}".format(*FAMILIES.get(f, FAMILIES["other"])[:2]) for f in names_by_family)
    ax.legend(fontsize=fontsize, title=title, title_fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0, frameon=False)


def tokens_axes(ax: Any, series: Sequence[Series], *, budgets: Sequence[float] | None = None,
                reference: float | None = None, reference_interval: Sequence[float] | None = None,
                reference_name: str = "unpruned", title: str = "", xlabel: str = "visual tokens kept",
                ylabel: str = "accuracy", dodge: float = 0.04, legend: bool = True,
                names: Sequence[str] = ()) -> None:
    """Draws `tokens_plot`'s panel on an existing Axes (several panels in one figure: `names`
    lists every series of the figure, so each keeps one colour and marker across panels)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    groups = _by_family(series, names)
    style = _styles(groups)
    order = [name for group in groups.values() for name in group]
    _reference(ax, reference, reference_interval, reference_name)
    for s in series:
        idx = order.index(s.name)
        # a small sideways shift per series (in octaves) so the error bars of one budget do not overlap
        shift = 2 ** (dodge * (idx - (len(order) - 1) / 2)) if dodge else 1.0
        pts = sorted(zip(s.x, s.y, s.low or [None] * len(s.x), s.high or [None] * len(s.x)), key=lambda p: p[0])
        xs = [p[0] * shift for p in pts]
        ys = [p[1] for p in pts]
        yerr = None
        if s.low is not None and s.high is not None:
            yerr = [[max(p[1] - p[2], 0.0) for p in pts], [max(p[3] - p[1], 0.0) for p in pts]]
        ax.errorbar(xs, ys, yerr=yerr, label=s.name, color=style.colours[s.name], marker=style.markers[s.name],
                    markersize=5, linewidth=1.4, elinewidth=0.9, capsize=2.5, zorder=2)
    ax.set_xscale("log", base=2)
    ticks = sorted({float(b) for b in budgets}) if budgets else sorted({float(x) for s in series for x in s.x})
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(ticks[0] / 2 ** 0.4, ticks[-1] * 2 ** 0.4)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if legend:
        _legend(ax, groups)


def tokens_plot(series: Sequence[Series], path: str | Path, *, budgets: Sequence[float] | None = None,
                reference: float | None = None, reference_interval: Sequence[float] | None = None,
                reference_name: str = "unpruned", title: str = "", xlabel: str = "visual tokens kept",
                ylabel: str = "accuracy", size: tuple[int, int] = (1100, 620), dodge: float = 0.04) -> Any:
    """Score vs visual tokens kept: one line per series with its interval as error bars (points
    shifted sideways by `dodge` octaves per series so the bars stay apart; 0 for none), x ticks
    at `budgets` (default: every x), `reference` (the unpruned score) dashed with its
    `reference_interval` shaded. Writes a `size`-pixel PNG to `path`; returns the Figure."""
    fig = _figure(size)
    ax = fig.add_subplot()
    tokens_axes(ax, series, budgets=budgets, reference=reference, reference_interval=reference_interval,
                reference_name=reference_name, title=title, xlabel=xlabel, ylabel=ylabel, dodge=dodge)
    _save(fig, path)
    return fig


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no cheaper-or-equal point beats: cost ascending, score strictly rising."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.cost, -p.y)):
        if not front or p.y > front[-1].y:
            front.append(p)
    return front


def pareto_axes(ax: Any, points: Sequence[Point], *, reference: Point | None = None, title: str = "",
                xlabel: str = "prefill FLOPs", ylabel: str = "accuracy", log_x: bool = True,
                annotate: bool = True, legend: bool = True, names: Sequence[str] = ()) -> list[Point]:
    """Draws `pareto_plot`'s panel on an existing Axes (`names`: as for `tokens_axes`); returns
    the front."""
    groups = _by_family(points, names)
    style = _styles(groups)
    for name in [n for names in groups.values() for n in names]:
        mine = [p for p in points if p.name == name]
        yerr = None
        if all(p.low is not None and p.high is not None for p in mine):
            yerr = [[max(p.y - p.low, 0.0) for p in mine], [max(p.high - p.y, 0.0) for p in mine]]
        ax.errorbar([p.cost for p in mine], [p.y for p in mine], yerr=yerr, label=name, color=style.colours[name],
                    marker=style.markers[name], markersize=5, linestyle="none", elinewidth=0.8, capsize=2, zorder=3)
    everything = list(points) + ([reference] if reference is not None else [])
    if reference is not None:
        ax.errorbar([reference.cost], [reference.y], label=reference.name, color="black", marker="*", markersize=11,
                    linestyle="none", zorder=4)
    front = pareto_front(everything)
    if front:
        xs, ys = [p.cost for p in front], [p.y for p in front]
        ax.plot(xs, ys, drawstyle="steps-post", color="0.25", linewidth=1.0, linestyle=":", zorder=2,
                label="Pareto front")
        if annotate:
            for p in front:
                ax.annotate(p.label, (p.cost, p.y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color="0.2")
    if log_x:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3, which="both")
    if legend:
        _legend(ax, groups)
    return front


def pareto_plot(points: Sequence[Point], path: str | Path, *, reference: Point | None = None, title: str = "",
                xlabel: str = "prefill FLOPs", ylabel: str = "accuracy", log_x: bool = True,
                size: tuple[int, int] = (1100, 620)) -> Any:
    """Score vs cost, one marker per configuration (its interval as an error bar), the unpruned
    `reference` as a star, the Pareto front dotted and its points named. Writes a `size`-pixel
    PNG to `path`; returns the Figure."""
    fig = _figure(size)
    ax = fig.add_subplot()
    pareto_axes(ax, points, reference=reference, title=title, xlabel=xlabel, ylabel=ylabel, log_x=log_x)
    _save(fig, path)
    return fig


def panels(draw: Sequence[Any], path: str | Path, *, size_per_panel: tuple[int, int] = (520, 420),
           legend_width: int = 200) -> Any:
    """One figure of side-by-side panels: `draw` holds one callable(ax) per panel (e.g. a
    `functools.partial` of `tokens_axes`). Writes the PNG; returns the Figure."""
    n = max(len(draw), 1)
    fig = _figure((size_per_panel[0] * n + legend_width, size_per_panel[1]))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, fn in zip(axes, draw):
        fn(ax)
    _save(fig, path)
    return fig
