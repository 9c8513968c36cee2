"""`vlm-prune demo`: every method at four budgets on the bundled fixture model.

The fixture (vlm_prune/fixture_model) is a small LLaVA-architecture model trained by the
project on a synthetic VQA task whose answers depend on small image regions (colours, shapes,
counts, positions of a few objects), so choosing the wrong tokens loses answers. The demo scores
the unpruned model and each configuration at 72, 36, 16 and 8 of the 144 visual tokens on the
seeded test split: accuracy with a 95% bootstrap interval, retention vs unpruned, tokens kept,
and the prefill speed-up two ways -- the theoretical ratio of the LLM's prefill FLOPs
(`vlm_prune.flops`, exact for the sequence lengths each decoder layer saw) and the measured
ratio of prefill times, unpruned vs pruned interleaved round by round on one batch by the bench
harness (`vlm_prune.benchmark`), shown only where the per-round ratios agree (their IQR at most
`STABLE_SPREAD` of their median), else "—". It writes a Markdown table, a JSON file and two
PNG plots (matplotlib, the `plot` extra): accuracy vs visual tokens kept and accuracy vs LLM
prefill FLOPs (the Pareto front).

A row is a method name ("cls_attention": one row per budget), a configuration string with its
keep ("cls_attention:36", "fastv:16:layer=2": one row) or a pipeline ("visionzip+transition":
one row per budget, the vision stage keeping `pipeline_first_keep(budget)` and the in-LLM stage
the budget; "visionzip:72+fastv:16:layer=1": one row) -- `vlm_prune.pipeline_config`'s syntax.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import api
from .registry import get_method

BUDGETS = [72, 36, 16, 8]  # of 144 visual tokens: 50%, 25%, 11%, 5.6%
# globalcom2 is left out: it reduces LLaVA-NeXT's crops (families=("llava_next",)), and the
# fixture is a LLaVA-1.5-architecture model (one 12 x 12 grid per image), where it is refused.
METHODS = ["cls_attention", "visionzip", "divprune", "cdpruner", "fopru", "dct", "text_recovery", "transition",
           "visiondrop", "fastv", "pool", "random", "visionzip+transition", "cls_attention+fastv"]
OPTIONS = {"fastv": {"layer": 1}}  # the fixture LLM has 3 layers: FastV's K=2 of 32 scaled down
# `--variants`: the named departures from the releases, scored beside the defaults
VARIANTS = [
    ("dct", {"rescale": True}),
    ("text_recovery", {"mode": "fixed"}),
    ("text_recovery", {"score": "fastervlm"}),
    ("visionzip", {"layout": "raster"}),
    ("transition", {"iga_layer": "own", "ttv_softmax": "visual"}),
]
VISUAL_TOKENS = 144
TIMING_ROUNDS = 5  # measured rounds of the interleaved timing (after one warm-up round)
TIMING_BATCH = 16  # questions in the timed prefill
STABLE_SPREAD = 0.10  # a measured ratio is shown when the IQR of its per-round ratios is <= 10% of their median


def pipeline_first_keep(budget: int) -> int:
    """The vision stage's keep of a pipeline row at `budget` (the in-LLM stage keeps `budget`):
    twice the budget, at most 3/4 of the image (72 -> 108, 36 -> 72, 16 -> 32, 8 -> 16)."""
    return min(2 * budget, VISUAL_TOKENS * 3 // 4)


@dataclass(frozen=True)
class RowConfig:
    """One row of the demo: its name, its budget (visual tokens after the last stage) and the
    stages patched ((method, keep, options) each; one method, or a pipeline's stages in order)."""

    label: str
    budget: int | float
    stages: tuple[tuple[str, int | float, dict], ...]

    @property
    def method(self) -> str:
        return "+".join(name for name, _, _ in self.stages)

    def describe(self) -> str:
        """The configuration string of this row ("visionzip:32+transition:16")."""
        return "+".join(":".join([name, f"{keep:g}"] + [f"{k}={json.dumps(v)}" for k, v in opts.items()])
                        for name, keep, opts in self.stages)

    def check(self) -> None:
        """Validates the configuration (ValueError / TypeError naming what is wrong), patching nothing."""
        from .config import PruneConfig
        from .pipeline_config import pipeline_config

        if len(self.stages) == 1:
            name, keep, opts = self.stages[0]
            PruneConfig.from_kwargs(name, keep, **opts)
        else:
            pipeline_config(self.method, keep=tuple(k for _, k, _ in self.stages),
                            stage_options=[dict(o) for _, _, o in self.stages])

    def patch(self, model: torch.nn.Module, positions: str | None = None) -> Any:
        """Patches `model` with this row's configuration; `positions` goes to the stages that take it
        (a stage's own `positions` option wins)."""
        takes = [_takes_positions(name) for name, _, _ in self.stages]
        extra = {"positions": positions} if positions and any(takes) else {}
        if len(self.stages) == 1:
            name, keep, opts = self.stages[0]
            return api.patch(model, name, keep, **{**extra, **opts})
        return api.patch(model, self.method, keep=tuple(k for _, k, _ in self.stages),
                         stage_options=[dict(o) for _, _, o in self.stages], **extra)


def label(method: str, options: dict) -> str:
    """"dct" or "dct (rescale=True)": a row's name."""
    return method + (" (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else "")


def _own_options(name: str, options: dict) -> dict:
    """The options of a stage that differ from the demo's own (`OPTIONS`): what a label shows."""
    return {k: v for k, v in options.items() if OPTIONS.get(name, {}).get(k, object()) != v}


def expand(spec: str | tuple[str, dict], budgets: Sequence[int]) -> list[RowConfig]:
    """The rows of one entry of the method list: a (method, options) pair or a string (see the
    module docstring). A string without keeps gives one row per budget; with keeps, one row."""
    from .pipeline_config import parse_stages

    if isinstance(spec, tuple):
        stages = [(spec[0], None, dict(spec[1]))]
    else:
        stages = parse_stages(spec)
    for name, _, _ in stages:
        get_method(name)  # an unknown method fails here, before anything runs
    keeps = [k for _, k, _ in stages]
    merged = [{**OPTIONS.get(name, {}), **opts} for name, _, opts in stages]
    if len(stages) == 1:
        (name, keep, opts), = stages
        name_ = label(name, _own_options(name, opts))
        todo = budgets if keep is None else [keep]
        return [RowConfig(name_, k, ((name, k, merged[0]),)) for k in todo]
    if all(k is None for k in keeps):  # a pipeline template: one row per budget
        name_ = "+".join(label(n, _own_options(n, o)) for n, _, o in stages)
        if len(stages) != 2:
            raise ValueError(f"{spec!r}: a pipeline without keeps has two stages (one row per budget: the first keeps "
                             "pipeline_first_keep(budget), the second the budget); give longer pipelines their keeps")
        return [RowConfig(name_, b, ((stages[0][0], pipeline_first_keep(b), merged[0]), (stages[1][0], b, merged[1])))
                for b in budgets]
    if any(k is None for k in keeps):
        raise ValueError(f"{spec!r}: give every stage its keep ('visionzip:72+fastv:16') or none "
                         "('visionzip+fastv': one row per budget)")
    name_ = "+".join(label(n, _own_options(n, o)) if i == len(stages) - 1 else label(f"{n}:{k:g}", _own_options(n, o))
                     for i, (n, k, o) in enumerate(stages))
    return [RowConfig(name_, keeps[-1], tuple((n, k, o) for (n, k, _), o in zip(stages, merged)))]


def bootstrap_interval(correct: list[bool], samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `correct`."""
    values = np.asarray(correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _takes_positions(method: str) -> bool:
    cls = get_method(method)
    return cls.stage == "vision" or bool(getattr(cls, "position_policies", ()))


class _Prepared:
    """The processor, memoised per batch: every configuration scores the same items in the same
    batches, so each batch's tensors are computed once (the processor is a pure function of the
    images and prompts; the model reads its inputs and never writes them)."""

    def __init__(self, processor: Any):
        self.processor, self.tokenizer = processor, processor.tokenizer
        self._cache: dict[tuple, Any] = {}

    def __call__(self, images: Sequence[Any], text: Sequence[str], **kwargs: Any) -> Any:
        key = (tuple(map(id, images)), tuple(text), tuple(sorted(kwargs.items())))
        if key not in self._cache:
            self._cache[key] = self.processor(images=images, text=text, **kwargs)
        return self._cache[key]


# ----------------------------------------------------------------------------- speed


def speed_cell(ratio: float | None, spread: float | None, limit: float = STABLE_SPREAD) -> str:
    """A measured ratio as a table cell: "2.31x (IQR 6%)" where the spread (the IQR of the per-round
    ratios over their median) is at most `limit`, else "—" (not measured: "—" too)."""
    if ratio is None or spread is None or not np.isfinite(spread) or spread > limit:
        return "—"
    return f"{ratio:.2f}x (IQR {100 * spread:.0f}%)"


def paired_ratios(baseline: Sequence[float], variant: Sequence[float]) -> tuple[float, float]:
    """(median, spread) of the per-round ratios baseline[i] / variant[i] -- round i timed both
    back to back, so drift of the host reaches the two alike; spread = IQR / median."""
    from .benchmark import Stats

    if not baseline or len(baseline) != len(variant):
        raise ValueError(f"{len(baseline)} baseline and {len(variant)} variant samples: one of each per round")
    stats = Stats.of([b / v for b, v in zip(baseline, variant)])
    return stats.median, stats.spread


@dataclass
class Speed:
    """The speed columns of one row."""

    flops_ratio: float  # unpruned / pruned theoretical LLM prefill FLOPs
    llm_lengths: list[int]  # tokens each decoder layer processed (the timed batch's longest row)
    llm_ratio: float | None = None  # measured LLM prefill (decoder alone) unpruned / pruned, median
    llm_spread: float | None = None
    e2e_ratio: float | None = None  # measured whole forward (vision tower, selection, LLM)
    e2e_spread: float | None = None
    rounds: int = 0
    samples: dict = field(default_factory=dict)  # seconds per round: {"unpruned": {"llm": [...], ...}, "pruned": ...}


class _LLMTimer:
    """The language model's forward time and input length, by a pre- and a post-hook."""

    def __init__(self, module: torch.nn.Module):
        self.elapsed, self.tokens, self._start = 0.0, 0, 0.0
        self._handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                         module.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        embeds, ids = kwargs.get("inputs_embeds"), kwargs.get("input_ids")
        self.tokens = (embeds if embeds is not None else ids).shape[1]
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.elapsed = time.perf_counter() - self._start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def measure_speed(model: torch.nn.Module, inputs: Any, patch: Any, rounds: int = TIMING_ROUNDS,
                  threads: int | None = None) -> Speed:
    """Unpruned vs `patch()` (a callable that patches `model`) on one batch `inputs`: the LLM
    FLOPs ratio of the sequence lengths the decoder saw, and -- with `rounds` > 0 -- the measured
    ratios of `rounds` interleaved rounds after a warm-up round (`vlm_prune.benchmark.measure`)."""
    from .benchmark import Variant, measure
    from .flops import prefill_flops

    timer = _LLMTimer(model.model.language_model)
    seen: dict[str, Any] = {}

    @contextlib.contextmanager
    def patched() -> Iterator[None]:
        seen["handle"] = patch()
        try:
            yield
        finally:
            api.unpatch(model)

    def prefill() -> None:
        model(**inputs, logits_to_keep=1)

    def unpruned_extras(_):
        seen["unpruned_tokens"] = timer.tokens
        return {"llm": timer.elapsed}

    def pruned_extras(_):
        seen["lengths"] = seen["handle"].layer_lengths
        return {"llm": timer.elapsed}

    try:
        with torch.inference_mode():
            result = measure([Variant("unpruned", prefill, extras=unpruned_extras),
                              Variant("pruned", prefill, around=patched, extras=pruned_extras)],
                             rounds=max(rounds, 1), warmup_rounds=1 if rounds else 0, threads=threads)
    finally:
        timer.close()
        api.unpatch(model)
    text_config = model.config.text_config
    lengths = list(seen["lengths"])
    flops = prefill_flops(text_config, seen["unpruned_tokens"]).ratio_to(prefill_flops(text_config, lengths))
    speed = Speed(flops_ratio=flops, llm_lengths=lengths, rounds=rounds)
    if rounds:
        speed.samples = {v: {m: list(s) for m, s in result.samples[v].items()} for v in ("unpruned", "pruned")}
        speed.llm_ratio, speed.llm_spread = paired_ratios(result.samples["unpruned"]["llm"],
                                                          result.samples["pruned"]["llm"])
        speed.e2e_ratio, speed.e2e_spread = paired_ratios(result.samples["unpruned"]["time"],
                                                          result.samples["pruned"]["time"])
    return speed


# ----------------------------------------------------------------------------- the run


def run(threads: int = 1, n: int = 600, batch_size: int = 50, out: str | Path = "demo-results",
        methods: Sequence[str] | None = None, budgets: Sequence[int] | None = None, positions: str | None = None,
        variants: bool = False, timing_rounds: int | None = TIMING_ROUNDS) -> list[dict]:
    """`methods`: method names, configuration strings or pipelines (see the module docstring;
    default `METHODS`); `budgets`: visual tokens kept of 144 (default `BUDGETS`); `positions`
    ("renumber" / "original"; None = each method's default: renumber on this LLaVA) applies to
    the methods that take it (the vision-stage ones and `transition`); `variants`: also score the
    named departures from the releases (`VARIANTS`); `timing_rounds`: rounds of the measured
    speed-up (0: the FLOPs ratio only)."""
    from vlm_prune.evals.synthetic_vqa import make_split

    from .fixture import evaluate, load

    methods, budgets, out = list(methods or METHODS), list(budgets or BUDGETS), Path(out)
    chosen: list[str | tuple[str, dict]] = list(methods)
    if variants:
        chosen += [v for v in VARIANTS if v[0] in methods]
    configs = [row for spec in chosen for row in expand(spec, budgets)]
    for config in configs:  # every row checked before the run
        config.check()
    timing_rounds = TIMING_ROUNDS if timing_rounds is None else timing_rounds
    if timing_rounds < 0:
        raise ValueError(f"timing_rounds={timing_rounds}: must be >= 0 (0: the FLOPs ratio only)")
    torch.set_num_threads(threads)
    model, processor = load()
    prepared = _Prepared(processor)
    items = make_split("test", n)
    timed = items[:min(TIMING_BATCH, n)]
    timed_inputs = processor(images=[it.image for it in timed], text=[it.prompt for it in timed], padding=True,
                             return_tensors="pt")
    rows = []
    with torch.inference_mode(), tqdm(total=len(configs) + 1, desc="demo", unit="config") as bar:
        for config in [None] + configs:
            handle = None if config is None else config.patch(model, positions)
            start = time.perf_counter()
            result = evaluate(model, prepared, items, batch_size=batch_size)
            seconds = time.perf_counter() - start
            stats = [] if handle is None else handle.stats
            api.unpatch(model)
            low, high = bootstrap_interval(result["correct"])
            row = dict(method="unpruned" if config is None else config.label,
                       keep=VISUAL_TOKENS if config is None else config.budget,
                       config="none" if config is None else config.describe(),
                       positions=positions if positions and config is not None and any(
                           _takes_positions(s[0]) for s in config.stages) else "default",
                       kept=VISUAL_TOKENS if not stats else round(sum(s["kept"] for s in stats) / len(stats), 1),
                       accuracy=result["accuracy"], ci95=[low, high], seconds=seconds, per_qtype=result["per_qtype"])
            if config is not None and len(config.stages) > 1 and stats:  # a pipeline: what each stage passed on
                per_stage = [s.get("kept_per_stage") or (s.get("after_vision", s["kept"]), s["kept"]) for s in stats]
                row["kept_stages"] = [round(float(np.mean(col)), 1) for col in zip(*per_stage)]
            if config is not None:
                speed = measure_speed(model, timed_inputs, lambda c=config: c.patch(model, positions),
                                      rounds=timing_rounds, threads=threads)
                row.update(flops_ratio=speed.flops_ratio, llm_lengths=speed.llm_lengths, timing_rounds=speed.rounds,
                           llm_speedup=speed.llm_ratio, llm_spread=speed.llm_spread,
                           e2e_speedup=speed.e2e_ratio, e2e_spread=speed.e2e_spread)
            rows.append(row)
            bar.update()
    base = rows[0]
    measured = 1.0 if timing_rounds else None  # the baseline against itself; "—" where nothing was timed
    base.update(flops_ratio=1.0, llm_speedup=measured, llm_spread=measured and 0.0, e2e_speedup=measured,
                e2e_spread=measured and 0.0, timing_rounds=timing_rounds)
    for row in rows:
        row["retention"] = row["accuracy"] / base["accuracy"]
    _report(rows, out, n, threads, positions, timing_rounds, len(timed))
    return rows


# ----------------------------------------------------------------------------- the report


def _kept_cell(row: dict) -> str:
    if "kept_stages" in row:
        return " → ".join(f"{k:g}" for k in row["kept_stages"])
    return f"{row['kept']:g}"


def table(rows: list[dict]) -> list[str]:
    """The Markdown table of the demo's rows."""
    lines = ["| method | keep | tokens kept | accuracy (95% CI) | retention | LLM FLOPs speed-up "
             "| measured LLM prefill speed-up | measured whole-prefill speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['keep']:g} | {_kept_cell(r)} | {100 * r['accuracy']:.1f} "
                     f"({100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f}) | {100 * r['retention']:.1f}% | "
                     f"{r['flops_ratio']:.2f}x | {speed_cell(r.get('llm_speedup'), r.get('llm_spread'))} | "
                     f"{speed_cell(r.get('e2e_speedup'), r.get('e2e_spread'))} |")
    return lines


def _report(rows: list[dict], out: Path, n: int, threads: int, positions: str | None = None,
            timing_rounds: int = TIMING_ROUNDS, timing_batch: int = TIMING_BATCH) -> None:
    out.mkdir(parents=True, exist_ok=True)
    policy = f", vision-stage positions={positions}" if positions else ""
    lines = [f"vlm_prune demo: fixture LLaVA ({VISUAL_TOKENS} visual tokens), synthetic VQA test split, n={n}, "
             f"{threads} thread(s){policy}", ""] + table(rows)
    measured = (f"measured = the median over {timing_rounds} interleaved rounds of unpruned / pruned prefill time "
                f"of one batch of {timing_batch} questions (the LLM alone; the whole forward: vision tower, "
                f"selection, LLM), shown where the IQR of the per-round ratios is at most {100 * STABLE_SPREAD:.0f}% "
                "of their median (IQR: the ratios' spread), else —" if timing_rounds else "not measured (--timing-rounds 0)")
    lines += ["", "Speed-ups: LLM FLOPs = unpruned / pruned theoretical prefill FLOPs of the decoder "
                  "(vlm_prune.flops, the lengths each layer saw); " + measured + "."]
    text = "\n".join(lines)
    print("\n" + text)
    (out / "demo.md").write_text(text + "\n")
    (out / "demo.json").write_text(json.dumps(rows, indent=2))
    written = [out / "demo.md", out / "demo.json"]
    try:
        written += plots(rows, out, n)
    except ImportError as error:  # MatplotlibMissing: the tables are written, the plots are not
        print(f"\n{error} (the table and the JSON are written; the plots are not)", file=sys.stderr)
    print(f"\nwrote {', '.join(map(str, written))}")
    print('Try it on your model:  handle = vlm_prune.patch(model, method="cls_attention", keep=64)')


def plots(rows: list[dict], out: Path, n: int) -> list[Path]:
    """accuracy_vs_tokens.png and accuracy_vs_flops.png of the demo's rows (needs matplotlib)."""
    from .plot import Point, Series, pareto_plot, tokens_plot

    base, rest = rows[0], rows[1:]
    series: dict[str, Series] = {}
    for r in rest:
        s = series.setdefault(r["method"], Series(r["method"], [], [], [], []))
        s.x.append(r["kept"])
        s.y.append(r["accuracy"])
        s.low.append(r["ci95"][0])
        s.high.append(r["ci95"][1])
    budgets = sorted({r["keep"] for r in rest if float(r["keep"]).is_integer() and r["keep"] >= 1})
    title = f"fixture LLaVA, synthetic VQA (n={n})"
    tokens_plot(list(series.values()), out / "accuracy_vs_tokens.png", budgets=budgets,
                         reference=base["accuracy"], reference_interval=base["ci95"],
                         title=title + ": accuracy vs visual tokens kept (95% intervals)",
                         xlabel=f"visual tokens kept (of {VISUAL_TOKENS}; points dodged sideways)")
    points = [Point(r["method"], r["keep"], 100 / r["flops_ratio"], r["accuracy"], r["ci95"][0], r["ci95"][1])
              for r in rest]
    reference = Point("unpruned", None, 100.0, base["accuracy"], *base["ci95"], family="other")
    pareto_plot(points, out / "accuracy_vs_flops.png", reference=reference,
                         title=title + ": accuracy vs LLM prefill FLOPs",
                         xlabel="LLM prefill FLOPs, % of unpruned (vlm_prune.flops)")
    return [out / "accuracy_vs_tokens.png", out / "accuracy_vs_flops.png"]
