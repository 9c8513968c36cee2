"""Pipelines: several methods run in order, one configuration.

    vlm_prune.patch(model, "visionzip+transition", keep=(192, 64))     # VisionZip to 192, then TransPrune to 64
    vlm_prune.patch(model, "visionzip:192+transition:64:alpha=0.5")    # the string form: keep and options per stage
    vlm_prune.patch(model, "cls_attention+divprune", keep=(192, 64))  # two vision stages
    vlm_prune.patch(model, "cls_attention:288+divprune:144+fastv:64:layer=1")

A pipeline is one or more vision-stage methods, then at most one in-LLM method; each stage's
`keep` applies to the tokens that reach it (an int: tokens kept per image; a float: the fraction
of those). A later vision stage reduces what the stage before it passed on (see
`vlm_prune.patches.image_tokens.reduce_in_stages`), so it must work on any subset of an image's
tokens: methods that need the image's full 2-D grid or the whole image (`pool`, `dct`, `evs`,
`fopru` with strategy="row", `globalcom2`) may only be the first (`later_stage_refusal`).
Options: one a stage's method declares goes to that stage (an option several stages declare is
ambiguous: give it per stage with `stage_options=[{...}, {...}]`); common options (`positions`,
`budget`, `video_budget`, `backend`) go to every stage that takes them. A configuration string
(`vlm-prune eval --compare`, `vlm-prune bench --method`) is "method[:keep[:name=value...]]" per
stage, joined by '+' (options separated by ':' or ','); values are read as JSON where they parse,
else as strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from .config import COMMON_OPTIONS, PruneConfig, is_number
from .registry import get_method

SEPARATOR = "+"


@dataclass(frozen=True)
class PipelineConfig:
    """The validated stages of a pipeline, in order: one or more vision-stage configs, then at
    most one in-LLM config. Checked at construction (the order, and that a later vision stage
    can reduce a subset of an image's tokens): ValueError naming what is wrong."""

    stages: tuple[PruneConfig, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if len(self.stages) > 1:
            check_stages(self.method, self.stages)

    @property
    def vision_stages(self) -> tuple[PruneConfig, ...]:
        """The vision-stage configs, in order."""
        return tuple(stage for stage in self.stages if get_method(stage.method).stage == "vision")

    @property
    def llm_stage(self) -> PruneConfig | None:
        """The in-LLM config, or None for a pipeline of vision stages only."""
        last = self.stages[-1]
        return last if get_method(last.method).stage == "llm" else None

    @property
    def method(self) -> str:
        return SEPARATOR.join(stage.method for stage in self.stages)

    @property
    def keep(self) -> tuple[int | float, ...]:
        return tuple(stage.keep for stage in self.stages)

    def as_kwargs(self) -> dict[str, Any]:
        """The arguments of `vlm_prune.patch` that rebuild this pipeline."""
        stage_options = []
        for stage in self.stages:
            kwargs = stage.as_kwargs()
            del kwargs["method"], kwargs["keep"]
            stage_options.append({k: v for k, v in kwargs.items() if v is not None})
        return dict(method=self.method, keep=self.keep, stage_options=stage_options)


def is_pipeline(method: Any) -> bool:
    return isinstance(method, str) and (SEPARATOR in method or ":" in method)


def parse_stages(method: str) -> list[tuple[str, int | float | None, dict[str, Any]]]:
    """"a:192+b:64:alpha=0.5" -> [("a", 192, {}), ("b", 64, {"alpha": 0.5})]; a stage without a
    keep gives None."""
    stages = []
    for text in _split(method, SEPARATOR):
        parts = _split(text.strip(), ":,")
        name = parts[0].strip() if parts else ""
        if not name:
            raise ValueError(f"method={method!r}: an empty stage; write stages as 'method[:keep[:name=value]]' "
                             f"joined by {SEPARATOR!r}")
        keep = _read_value(parts[1]) if len(parts) > 1 and parts[1] else None
        options = {}
        for item in filter(None, parts[2:]):
            if "=" not in item:
                raise ValueError(f"method={method!r}: stage option {item!r} is not 'name=value'")
            key, value = item.split("=", 1)
            options[key.strip()] = _read_value(value)
        stages.append((name, keep, options))
    return stages


def _split(text: str, separators: str) -> list[str]:
    """`text` split at the separators outside brackets ("a:b=[1,[2,3]]" -> ["a", "b=[1,[2,3]]"])."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{(" and 1 or 0
        depth -= char in "]})" and 1 or 0
        if char in separators and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def _read_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.strip()


def pipeline_config(method: str, keep: Any = None, stage_options: Sequence[dict[str, Any]] | None = None,
                    **options: Any) -> PipelineConfig:
    """Validates a pipeline (see the module docstring); ValueError / TypeError naming what is wrong."""
    stages = parse_stages(method)
    n = len(stages)
    if keep is not None:
        if is_number(keep) and n == 1:
            keep = (keep,)
        if not isinstance(keep, (list, tuple)) or len(keep) != n:
            raise ValueError(f"keep={keep!r}: a pipeline of {n} stages ({method!r}) takes one keep per stage, "
                             f"e.g. keep={tuple([64] * n)!r}")
        given = [k for _, k, _ in stages if k is not None]
        if given:
            raise ValueError(f"method={method!r} gives keeps in the string and keep={keep!r} as well; give one")
    else:
        keep = [k for _, k, _ in stages]
        if None in keep:
            missing = [name for name, k, _ in stages if k is None]
            raise ValueError(f"method={method!r}: no keep for stage(s) {missing}; pass keep=(...) with one per stage "
                             "or write 'method:keep' for each")
    if stage_options is not None and (not isinstance(stage_options, (list, tuple)) or len(stage_options) != n
                                      or not all(isinstance(o, dict) for o in stage_options)):
        raise ValueError(f"stage_options={stage_options!r} must be a list of {n} dicts, one per stage of {method!r}")
    classes = [get_method(name) for name, _, _ in stages]  # an unknown method fails here
    per_stage = [dict(opts) for _, _, opts in stages]
    for name, value in options.items():
        if name in COMMON_OPTIONS:
            takers = [i for i, cls in enumerate(classes) if _takes_common(cls, name)]
        else:
            takers = [i for i, cls in enumerate(classes) if name in cls.options]
        if not takers:
            raise ValueError(f"option {name!r} belongs to no stage of {method!r}; the stages' options: "
                             + "; ".join(f"{cls.name}: {sorted(cls.options)}" for cls in classes))
        if len(takers) > 1 and name not in COMMON_OPTIONS:
            raise ValueError(f"option {name!r} is an option of several stages of {method!r} "
                             f"({[classes[i].name for i in takers]}); give it per stage with stage_options=[{{...}}, ...]")
        for i in takers:
            per_stage[i][name] = value
    for i, extra in enumerate(stage_options or []):
        per_stage[i].update(extra)
    if n > 1:
        _check_order(method, classes)  # before the stages' own checks: the order is the first thing wrong
    return PipelineConfig(tuple(PruneConfig.from_kwargs(cls.name, k, **opts)
                                for cls, k, opts in zip(classes, keep, per_stage)))


def _takes_common(cls: Any, name: str) -> bool:
    """Whether a stage's method takes the common option `name` (the in-LLM methods take
    `positions` only where they declare position policies, `budget` and `video_budget` not)."""
    if cls.stage == "vision" or name == "backend":
        return True
    return name == "positions" and bool(getattr(cls, "position_policies", ()))


def _check_order(method: str, classes: list[Any]) -> None:
    stages = [cls.stage for cls in classes]
    n_vision = next((i for i, stage in enumerate(stages) if stage != "vision"), len(stages))
    if n_vision == 0 or stages[n_vision:] not in ([], ["llm"]):
        raise ValueError(
            f"method={method!r}: a pipeline is one or more vision-stage methods, then at most one in-LLM method "
            f"(stages here: {' then '.join(stages)}); vision-stage methods: "
            f"{sorted(c for c in _names('vision'))}, in-LLM: {sorted(_names('llm'))}")


def check_stages(method: str, stages: Sequence[PruneConfig]) -> None:
    """ValueError unless `stages` are vision-stage configs, then at most one in-LLM config, and
    every vision stage after the first can reduce a subset of an image's tokens."""
    classes = [get_method(stage.method) for stage in stages]
    _check_order(method, classes)
    for position, (cls, stage) in enumerate(zip(classes, stages)):
        if cls.stage != "vision":
            continue
        why = later_stage_refusal(cls, stage.options) if position else None
        if why is not None:
            raise ValueError(
                f"method={method!r}: {cls.name!r} can only be the first vision stage of a pipeline: it {why}, and a "
                "later stage gets only the tokens the stage before it passed on (no full grid, no whole image); "
                f"put it first or choose another method")
        followed = position + 1 < len(classes) and classes[position + 1].stage == "vision"
        if followed and stage.options.get("layout") == "release":
            raise ValueError(
                f"method={method!r}: {cls.name!r} with layout='release' is followed by another vision stage, which "
                "reads each token's vision-tower signals at the slot it stands for; that layout puts tokens out of "
                "that order: use layout='raster' (or leave it 'auto': a vision stage another one follows orders "
                "its tokens as under positions='original')")


# Methods (by name) that need an image's full 2-D (or 3-D) token grid although their class does
# not say so through `output_is_grid` or `reduce_image`: the reason, or a function of the
# options that gives it (None: the options make the method fine on a subset). A method class may
# declare the same with a `later_stage_refusal(options)` class method of its own.
_FULL_GRID = {
    "evs": lambda options: "compares each video token with the same place in the previous frame (the full "
                           "(t, h, w) grid)",
    "fopru": lambda options: ("keeps whole rows of the token grid (strategy='row')"
                              if options.get("strategy") == "row" else None),
}


def later_stage_refusal(cls: Any, options: Any) -> str | None:
    """Why vision-stage method `cls` (with `options`) cannot be a later stage of a pipeline --
    one that reduces a subset of an image's tokens, with no grid (each region handed over as a
    1 x n row) -- or None when it can."""
    own = getattr(cls, "later_stage_refusal", None)
    if own is not None:
        return own(options)
    if getattr(cls, "reduce_image", None) is not None:
        return "sets the budgets of an image's regions itself from the whole image (its base image and every crop)"
    if cls.output_is_grid:
        return "makes a coarser grid of the image's full 2-D token grid"
    rule = _FULL_GRID.get(cls.name)
    return rule(options) if rule is not None else None


def _names(stage: str) -> list[str]:
    from .registry import available_methods

    return [name for name in available_methods() if get_method(name).stage == stage]
