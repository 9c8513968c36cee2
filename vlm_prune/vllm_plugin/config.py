"""Reading and validating the plugin's configuration (the same names and checks as
`vlm_prune.patch`), plus what vLLM can and cannot do with it."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from ..config import PruneConfig
from ..registry import get_method

ENV_VAR = "VLM_PRUNE"


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
    if not isinstance(value, dict) or "method" not in value or "keep" not in value:
        raise ValueError(f"vlm_prune={value!r} must be an object with at least 'method' and 'keep'")
    return dict(value)


def plugin_config(hf_config: Any, family: str) -> PruneConfig | None:
    """The validated config for a model of `family`, or None when pruning is off.

    Raises ValueError (at engine start-up) for anything vLLM cannot serve: methods that prune
    inside the LLM (vLLM's paged KV cache is shared by all layers), budgets that depend on the
    image (vLLM reserves the placeholder tokens before the encoder runs), methods that need the
    question (the encoder never sees the prompt), and position policies the family cannot keep.
    Qwen-VL videos are pruned with the images, under `video_budget` (per frame or per video, the
    same validation as `vlm_prune.patch`; `evs` per video, its count fixed before the encoder);
    vLLM's own video pruning beside it is refused when the model is built (qwen2_vl.py).
    """
    options = raw_options(hf_config)
    if options is None:
        return None
    config = PruneConfig.from_kwargs(options.pop("method"), options.pop("keep"), **options)
    method = get_method(config.method)()
    if method.stage != "vision":
        raise ValueError(
            f"vlm_prune: method {config.method!r} prunes inside the LLM; on vLLM only vision-stage "
            "methods run (vLLM's paged KV cache is shared by all layers). Use it with transformers "
            "(vlm_prune.patch), or choose one of: cls_attention, dct, random, pool, visionzip, divprune"
        )
    if config.video_budget is not None and family != "qwen2_vl":
        raise ValueError(f"vlm_prune: video_budget={config.video_budget!r} applies to Qwen-VL videos only "
                         "(this model takes no videos)")
    if "question" in method.needs:
        raise ValueError(
            f"vlm_prune: method {config.method!r} needs the question, which vLLM's image encoder "
            "never sees; use it with transformers (vlm_prune.patch)"
        )
    if method.output_count(1, (2, 2), config.options) is None:
        raise ValueError(
            f"vlm_prune: {config.method!r} with options {dict(config.options)} keeps a number of "
            "tokens that depends on the image; vLLM needs a fixed budget"
        )
    if family == "qwen2_vl" and config.video_policy == "per_video" and \
            method.output_count(1, (2, 2, 2), config.options) is None:
        raise ValueError(
            f"vlm_prune: {config.method!r} with video_budget='per_video' keeps a number of video tokens that "
            "depends on the video; vLLM needs a fixed budget (use video_budget='per_frame')"
        )
    allowed_positions = {"llava": ("renumber",), "llava_next": ("renumber",), "qwen2_vl": ("original",)}[family]
    if family == "qwen2_vl" and method.output_is_grid:  # numbered as an image of the coarse grid
        allowed_positions = ("original", "renumber")
    if config.positions is not None and config.positions not in allowed_positions:
        raise ValueError(
            f"vlm_prune: positions={config.positions!r} is not available for this model on vLLM; "
            f"allowed: {list(allowed_positions)}"
        )
    if config.budget == "per_crop" and family != "llava_next":
        raise ValueError("vlm_prune: budget='per_crop' applies to LLaVA-NeXT only")
    # the defaults and option values vlm_prune.patch resolves for the same policy
    positions = config.positions or (
        method.release_positions if method.release_positions in allowed_positions else allowed_positions[0])
    return dataclasses.replace(config, positions=positions, budget=config.budget or method.default_budget,
                               options=method.resolve_options(config.options, positions))
