"""The benchmark harness of the three benches (`vlm-prune bench`, its vLLM backend and the GPU
kernel bench): warm-up, interleaved rounds of the variants being compared, medians and spread
per variant, ratios, a report (Markdown table + JSON) and the output folder.

    result = measure([Variant("unpruned", run_unpruned),
                      Variant("pruned", run_pruned, around=patched, extras=lambda out: {"select": ...})],
                     rounds=5, warmup_rounds=1, threads=2)
    result.median("pruned")                  # seconds: median of the timed calls ("time")
    result.median("pruned", "select")        # a metric the variant's `extras` reported
    result.ratio("unpruned", "pruned")       # median / median: the speed-up
    print(result.table(baseline="unpruned")) # n, median, IQR, min, max, IQR / median, ratio

Every round calls each variant in turn (in the order given), so drift of the host -- clock
boosts, other jobs, a warming cache -- reaches all of them alike; the samples of all rounds are
pooled into one median per variant and metric. A round is one *block* per variant: `around()`
is entered (untimed: a patch, an environment setting), `warmup_calls` untimed calls, `per_round`
timed calls (each followed by `extras(result)`, untimed), `around()` exited. `warmup_rounds`
whole rounds run first and are discarded.

Timing modes (`timing=`): "host" -- the host clock around the call (`time.perf_counter`, or an
injected `clock`); "cuda_events" -- CUDA events recorded around the call, then a device
synchronise (host launch cost included, as a user sees it); "cuda_graph" -- the callable is
captured `graph_calls` times into one CUDA graph (after 3 calls on a side stream), and each
sample is one replay timed with events, divided by `graph_calls`: the kernels' own device time.

Every metric is a duration in seconds; reports print milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

TIMINGS = ("host", "cuda_events", "cuda_graph")


@dataclass
class Variant:
    """One of the things compared. `fn` is the timed call; `around` (a context-manager factory)
    is entered around each of the variant's blocks, outside the clock; `extras(result)` runs
    after each timed call, inside `around` and outside the clock, and returns more measurements
    of that sample ({metric: seconds}); `group` names variants that stand or fall together (one
    that fails drops the whole group when errors are handled)."""

    name: str
    fn: Callable[[], Any]
    around: Callable[[], ContextManager] | None = None
    extras: Callable[[Any], Mapping[str, float]] | None = None
    group: str | None = None


@dataclass(frozen=True)
class Stats:
    n: int
    median: float
    mean: float
    min: float
    max: float
    q1: float
    q3: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stats":
        values = sorted(values)
        if not values:
            raise ValueError("no samples")
        q1, q3 = (statistics.quantiles(values, n=4, method="inclusive")[::2] if len(values) > 1
                  else (values[0], values[0]))
        return cls(len(values), statistics.median(values), statistics.fmean(values), values[0], values[-1], q1, q3)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def spread(self) -> float:
        """The interquartile range as a fraction of the median."""
        return self.iqr / self.median if self.median else 0.0

    def to_dict(self) -> dict:
        ms = {k: 1000 * getattr(self, k) for k in ("median", "mean", "min", "max", "q1", "q3")}
        return {"n": self.n, **{f"{k}_ms": v for k, v in ms.items()}, "spread": self.spread}


@dataclass
class Result:
    """What `measure` collected: samples[variant][metric] in seconds, pooled over the rounds."""

    variants: list[str]
    samples: dict[str, dict[str, list[float]]]
    errors: dict[str, str] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def failed(self, variant: str) -> bool:
        return variant in self.errors

    def metrics(self, variant: str) -> list[str]:
        return list(self.samples.get(variant, {}))

    def stats(self, variant: str, metric: str = "time") -> Stats:
        try:
            return Stats.of(self.samples[variant][metric])
        except (KeyError, ValueError):
            raise KeyError(f"no {metric!r} samples of variant {variant!r}"
                           + (f" (it failed: {self.errors[variant]})" if variant in self.errors else "")) from None

    def median(self, variant: str, metric: str = "time") -> float:
        return self.stats(variant, metric).median

    def ms(self, variant: str, metric: str = "time") -> float:
        """The median in milliseconds."""
        return 1000 * self.median(variant, metric)

    def ratio(self, numerator: str, denominator: str, metric: str = "time") -> float:
        """median(numerator) / median(denominator): with the baseline first, the speed-up."""
        return self.median(numerator, metric) / self.median(denominator, metric)

    def table(self, baseline: str | None = None) -> str:
        """Markdown: one row per variant and metric; with a baseline, median(baseline) / median."""
        return report_table(self.to_dict(), baseline)

    def to_dict(self) -> dict:
        return {
            "settings": dict(self.settings),
            "variants": {name: {metric: self.stats(name, metric).to_dict()
                                for metric, values in self.samples.get(name, {}).items() if values}
                         for name in self.variants},
            "errors": dict(self.errors),
        }


def report_table(report: Mapping, baseline: str | None = None) -> str:
    """The Markdown table of a `Result.to_dict()` (so a bench can print it from its JSON)."""
    head = "| variant | metric | n | median ms | IQR ms | min ms | max ms | IQR / median |"
    if baseline is not None:
        head += f" {baseline} / variant |"
    rows = [head, "|---" * (head.count("|") - 1) + "|"]
    variants, errors = report["variants"], report.get("errors", {})
    for name, metrics in variants.items():
        for metric, s in metrics.items():
            row = (f"| {name}{' (failed)' if name in errors else ''} | {metric} | {s['n']} | {s['median_ms']:.3f} | "
                   f"{s['q3_ms'] - s['q1_ms']:.3f} | {s['min_ms']:.3f} | {s['max_ms']:.3f} | "
                   f"{100 * s['spread']:.1f}% |")
            if baseline is not None:
                base = variants.get(baseline, {}).get(metric)
                row += f" {base['median_ms'] / s['median_ms']:.3f}x |" if base and s["median_ms"] else " - |"
            rows.append(row)
    return "\n".join(rows)


def describe(settings: Mapping) -> str:
    """One line: how a `Result` was measured."""
    clock = {"host": "host clock", "host_cpu": "process CPU time", "cuda_events": "CUDA events",
             "cuda_graph": "CUDA graph replays"}[settings["timing"]]
    parts = [f"{settings['rounds']} interleaved round(s) of {settings['per_round']} call(s) per variant",
             f"{settings['warmup_rounds']} warm-up round(s)"]
    if settings.get("warmup_calls"):
        parts.append(f"{settings['warmup_calls']} untimed call(s) per block")
    parts.append(clock + (f" ({settings['graph_calls']} calls per replay)" if settings.get("graph_calls") else ""))
    if settings.get("threads"):
        parts.append(f"{settings['threads']} thread(s)")
    return "harness: " + ", ".join(parts)


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block (None: left alone), then restored."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads={threads}: must be >= 1")
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _CudaGraph:
    """`fn` called `calls` times, captured in one CUDA graph; `replay()` replays them all."""

    def __init__(self, fn: Callable[[], Any], calls: int):
        import torch

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(calls):
                fn()
        self.replay = self.graph.replay


def _timer(timing: str, clock: Callable[[], float]) -> Callable[[Callable[[], Any]], tuple[Any, float]]:
    """timed(fn) -> (fn's result, seconds)."""
    if timing == "host":
        def timed(fn):
            start = clock()
            out = fn()
            return out, clock() - start
        return timed
    import torch

    def timed_events(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end) / 1000
    return timed_events


def measure(variants: Sequence[Variant], *, rounds: int, per_round: int = 1, warmup_rounds: int = 1,
            warmup_calls: int = 0, timing: str = "host", threads: int | None = None, graph_calls: int = 20,
            clock: Callable[[], float] = time.perf_counter,
            on_error: Callable[[Variant, Exception], None] | None = None) -> Result:
    """Runs `warmup_rounds` discarded rounds, then `rounds` timed ones, each calling every variant
    in turn (see the module docstring). `on_error`: None raises the first error; a callable is
    told (variant, error), the variant and its group are dropped from the later rounds, and the
    error is kept in `Result.errors`."""
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must differ: {names}")
    if timing not in TIMINGS:
        raise ValueError(f"timing={timing!r}: choose one of {', '.join(TIMINGS)}")
    for key, value, least in (("rounds", rounds, 1), ("per_round", per_round, 1), ("warmup_rounds", warmup_rounds, 0),
                              ("warmup_calls", warmup_calls, 0), ("graph_calls", graph_calls, 1)):
        if value < least:
            raise ValueError(f"{key}={value}: must be >= {least}")
    timed = _timer(timing, clock)
    samples: dict[str, dict[str, list[float]]] = {name: {"time": []} for name in names}
    errors: dict[str, str] = {}
    active = list(variants)
    calls: dict[str, Callable[[], Any]] = {v.name: v.fn for v in variants}
    divide = graph_calls if timing == "cuda_graph" else 1

    def fail(variant: Variant, error: Exception) -> None:
        if on_error is None:
            raise error
        errors[variant.name] = f"{type(error).__name__}: {error}"
        dropped = {v.name for v in active if v is variant or (variant.group is not None and v.group == variant.group)}
        for name in dropped - {variant.name}:
            errors.setdefault(name, f"its group {variant.group!r} failed in {variant.name!r}")
        active[:] = [v for v in active if v.name not in dropped]
        on_error(variant, error)

    def around(variant: Variant) -> ContextManager:
        return variant.around() if variant.around is not None else contextlib.nullcontext()

    with pinned_threads(threads):
        if timing == "cuda_graph":  # capture first: a call that cannot be captured fails here
            for variant in list(active):
                try:
                    with around(variant):
                        graph = _CudaGraph(variant.fn, graph_calls)
                    calls[variant.name] = graph.replay
                except Exception as error:
                    fail(variant, error)
        for step in range(-warmup_rounds, rounds):
            for variant in list(active):
                if variant not in active:  # its group failed earlier in this round
                    continue
                got: dict[str, list[float]] = {}
                try:
                    with around(variant):
                        fn = calls[variant.name]
                        for _ in range(warmup_calls):
                            fn()
                        for _ in range(per_round):
                            out, seconds = timed(fn)
                            got.setdefault("time", []).append(seconds / divide)
                            if variant.extras is not None:
                                for metric, value in variant.extras(out).items():
                                    got.setdefault(metric, []).append(float(value))
                except Exception as error:
                    fail(variant, error)
                    continue
                if step >= 0:  # a block counts whole or not at all
                    for metric, values in got.items():
                        samples[variant.name].setdefault(metric, []).extend(values)
    settings = dict(timing=timing, rounds=rounds, per_round=per_round, warmup_rounds=warmup_rounds,
                    warmup_calls=warmup_calls, threads=threads)
    if timing == "cuda_graph":
        settings["graph_calls"] = graph_calls
    if timing == "host" and clock is time.process_time:
        settings["timing"] = "host_cpu"
    return Result(names, samples, errors, settings)


class RunLog:
    """A bench's output: `print` prints and keeps each line in OUT/<name>-<time>.txt (the run
    log), `note` keeps a line in the log only, `save(data)` writes the JSON to
    OUT/<name>-<time>.json (and to `json_path` when given) -- after each section, so a run cut
    short still leaves its numbers. `out=None` writes no folder."""

    def __init__(self, out: str | Path | None, name: str, json_path: str | Path | None = None):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = None if out is None else Path(out) / f"{_slug(name)}-{stamp}"
        if base is not None:
            base.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = None if base is None else Path(f"{base}.txt")
        self.json_paths = [p for p in (None if base is None else Path(f"{base}.json"), json_path) if p]
        if self.log_path is not None:
            self.log_path.write_text("")

    def note(self, *parts: Any, sep: str = " ", end: str = "\n") -> None:
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(sep.join(map(str, parts)) + end)

    def print(self, *parts: Any, sep: str = " ", end: str = "\n") -> None:
        print(*parts, sep=sep, end=end, flush=True)
        self.note(*parts, sep=sep, end=end)

    def save(self, data: Mapping | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data, indent=2)
        for path in self.json_paths:
            Path(path).write_text(text)

    @property
    def paths(self) -> list[Path]:
        return [Path(p) for p in self.json_paths] + ([self.log_path] if self.log_path is not None else [])


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)
