"""Reading and validating the plugin's configuration (the same names and checks as
`vlm_prune.patch`), plus what vLLM can and cannot do with it.

A pipeline of vision-stage methods runs as on the transformers path
(`{"method": "cls_attention+divprune", "keep": [192, 64]}` or `{"method":
"cls_attention:192+divprune:64"}`, `stage_options` as in `vlm_prune.patch`): the plugin reduces
each image with every stage in turn (`vlm_prune.patches.image_tokens.reduce_in_stages`) and
reserves the last stage's count; an in-LLM stage is refused as an in-LLM method alone is.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass
from typing import Any

from ..config import PruneConfig
from ..patches.image_tokens import VisionStage
from ..pipeline_config import PipelineConfig, is_pipeline, pipeline_config
from ..registry import get_method

ENV_VAR = "VLM_PRUNE"
# the vision-stage methods the plugin serves with their defaults (a fixed count, no question)
SERVED = "cls_attention, dct, random, pool, visionzip, divprune, fopru, evs"
# how coarse each budget policy's regions are: a later stage's regions must hold a known number
# of the tokens the one before passed on, so its policy may not be finer (LLaVA-NeXT images,
# Qwen videos)
_COARSENESS = {"per_crop": 0, "per_image": 1, "pooled": 2}
_VIDEO_COARSENESS = {"per_frame": 0, "per_video": 1}


def raw_options(hf_config: Any) -> dict[str, Any] | None:
    """The `vlm_prune` entry of the HF config (--hf-overrides), else $VLM_PRUNE, else None."""
    value = getattr(hf_config, "vlm_prune", None)
    if value is None and os.environ.get(ENV_VAR):
        try:
            value = json.loads(os.environ[ENV_VAR])
        except json.JSONDecodeError as error:
            raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not valid JSON: {error}") from None
    if value is None:
        return None
    # a pipeline string may carry each stage's keep ("cls_attention:192+divprune:64")
    if not isinstance(value, dict) or "method" not in value or ("keep" not in value and not is_pipeline(value["method"])):
        raise ValueError(f"vlm_prune={value!r} must be an object with at least 'method' and 'keep'")
    return dict(value)


@dataclass(frozen=True)
class PluginPlan:
    """What the plugin runs on a model: the configuration (one method's, or a pipeline's), its
    vision stages as `reduce_in_stages` runs them (one for one method; options, budget and
    position policy resolved) and the one position policy they share."""

    config: PruneConfig | PipelineConfig
    stages: tuple[VisionStage, ...]
    positions: str

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def needs(self) -> frozenset[str]:
        """The signals any stage needs from the tower."""
        return frozenset().union(*(stage.method.needs for stage in self.stages))

    @property
    def video_in_one_pool(self) -> bool:
        """Whether some stage pools each video's frames (video_budget="per_video"): how many
        tokens each frame keeps is then known only once the encoder ran."""
        return any(stage.config.video_policy == "per_video" for stage in self.stages)


def plugin_config(hf_config: Any, family: str) -> PruneConfig | PipelineConfig | None:
    """The validated config for a model of `family` (a pipeline's: its stages, resolved), or
    None when pruning is off.

    Raises ValueError (at engine start-up) for anything vLLM cannot serve: methods that prune
    inside the LLM, alone or as a pipeline's stage (vLLM's paged KV cache is shared by all
    layers), budgets that depend on the image (vLLM reserves the placeholder tokens before the
    encoder runs), methods that need the question (the encoder never sees the prompt), and
    position policies the family cannot keep; in a pipeline, a later stage whose budget policy
    is finer than an earlier one's (its count would depend on the image).
    Qwen-VL videos are pruned with the images, under `video_budget` (per frame or per video, the
    same validation as `vlm_prune.patch`; `evs` per video, its count fixed before the encoder);
    vLLM's own video pruning beside it is refused when the model is built (qwen2_vl.py).
    """
    plan = plugin_plan(hf_config, family)
    return None if plan is None else plan.config


def plugin_plan(hf_config: Any, family: str) -> PluginPlan | None:
    """`plugin_config`, with the vision stages ready to run (None when pruning is off)."""
    options = raw_options(hf_config)
    if options is None:
        return None
    method, keep = options.pop("method"), options.pop("keep", None)
    if is_pipeline(method):
        configs = pipeline_config(method, keep, **options).stages
    elif "stage_options" in options:
        raise ValueError(f"vlm_prune: stage_options applies to pipelines ('a+b'); method={method!r} is one method")
    else:
        configs = (PruneConfig.from_kwargs(method, keep, **options),)
    name = "+".join(c.method for c in configs)
    methods = [get_method(c.method)() for c in configs]
    for config, method in zip(configs, methods):
        _check_stage(config, method, family, name)
    allowed = [p for p in _allowed_positions(methods[0], family)
               if all(p in _allowed_positions(m, family) for m in methods[1:])]
    given = list(dict.fromkeys(c.positions for c in configs if c.positions is not None))
    if len(given) > 1:
        raise ValueError(f"vlm_prune: positions: the vision stages of {name!r} share one position policy; got {given}")
    if given and given[0] not in allowed:
        raise ValueError(
            f"vlm_prune: positions={given[0]!r} is not available for this model on vLLM"
            + (f" with {name!r}" if len(configs) > 1 else "") + f"; allowed: {allowed}"
        )
    # the defaults and option values vlm_prune.patch resolves for the same policy
    releases = [m.release_positions for m in methods if m.release_positions in allowed]
    positions = given[0] if given else (releases[0] if releases else allowed[0])
    resolved = []
    for i, (config, method) in enumerate(zip(configs, methods)):
        # a stage another stage follows keeps each token at the slot it stands for
        order = positions if i == len(configs) - 1 else "original"
        resolved.append(dataclasses.replace(config, positions=positions,
                                            budget=config.budget or method.default_budget,
                                            options=method.resolve_options(config.options, order)))
    if len(resolved) > 1:
        _check_later_budgets(resolved, family, name)
    config = resolved[0] if len(resolved) == 1 else PipelineConfig(tuple(resolved))
    stages = tuple(VisionStage(method, c, c.budget) for method, c in zip(methods, resolved))
    return PluginPlan(config, stages, positions)


def _check_stage(config: PruneConfig, method: Any, family: str, name: str) -> None:
    """A stage's own checks (one method's, or a pipeline's stage)."""
    stage = "" if name == config.method else f" (a stage of {name!r})"
    if method.stage != "vision":
        raise ValueError(
            f"vlm_prune: method {config.method!r}{stage} prunes inside the LLM; on vLLM only vision-stage "
            "methods run (vLLM's paged KV cache is shared by all layers). Use it with transformers "
            f"(vlm_prune.patch), or choose one of: {SERVED}"
            + (f"; a pipeline of vision-stage methods only (e.g. drop {config.method!r})" if stage else "")
        )
    if config.video_budget is not None and family != "qwen2_vl":
        raise ValueError(f"vlm_prune: video_budget={config.video_budget!r} applies to Qwen-VL videos only "
                         "(this model takes no videos)")
    if "question" in method.needs:
        raise ValueError(
            f"vlm_prune: method {config.method!r}{stage} needs the question, which vLLM's image encoder "
            "never sees; use it with transformers (vlm_prune.patch)"
        )
    if method.output_count(1, (2, 2), config.options) is None:
        raise ValueError(
            f"vlm_prune: {config.method!r}{stage} with options {dict(config.options)} keeps a number of "
            "tokens that depends on the image; vLLM needs a fixed budget"
        )
    if family == "qwen2_vl" and config.video_policy == "per_video" and \
            method.output_count(1, (2, 2, 2), config.options) is None:
        raise ValueError(
            f"vlm_prune: {config.method!r}{stage} with video_budget='per_video' keeps a number of video tokens "
            "that depends on the video; vLLM needs a fixed budget (use video_budget='per_frame')"
        )
    if config.budget == "per_crop" and family != "llava_next":
        raise ValueError("vlm_prune: budget='per_crop' applies to LLaVA-NeXT only")


def _allowed_positions(method: Any, family: str) -> tuple[str, ...]:
    if family == "qwen2_vl":  # a coarse grid may be numbered as an image of that grid
        return ("original", "renumber") if method.output_is_grid else ("original",)
    return ("renumber",)  # LLaVA, LLaVA-NeXT: vLLM numbers placeholders consecutively


def _check_later_budgets(configs: list[PruneConfig], family: str, name: str) -> None:
    """vLLM fixes each image's count before the encoder runs: a later stage's regions must each
    hold a known number of the tokens passed on, i.e. its budget policy may not be finer than
    the one before (LLaVA-NeXT: per_crop, then per_image, then pooled; Qwen videos: per_frame,
    then per_video)."""
    for before, after in itertools.pairwise(configs):
        if family == "llava_next" and _COARSENESS[after.budget] < _COARSENESS[before.budget]:
            raise ValueError(
                f"vlm_prune: in {name!r} on vLLM, {after.method!r} (budget={after.budget!r}) follows {before.method!r} "
                f"(budget={before.budget!r}): how many of the tokens passed on fall in each of its regions depends "
                "on the image, and vLLM fixes the count before the encoder runs; give the later stage a budget "
                "policy at least as coarse (per_crop, then per_image, then pooled)")
        if family == "qwen2_vl" and _VIDEO_COARSENESS[after.video_policy] < _VIDEO_COARSENESS[before.video_policy]:
            raise ValueError(
                f"vlm_prune: in {name!r} on vLLM, {after.method!r} (video_budget={after.video_policy!r}) follows "
                f"{before.method!r} (video_budget={before.video_policy!r}): how many of a video's tokens each "
                "frame keeps depends on the video, and vLLM fixes the count before the encoder runs; give the later "
                "stage video_budget='per_video'")
