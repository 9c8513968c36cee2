"""A pipeline: one or more vision-stage methods, then at most one in-LLM method, on one model instance.

    vlm_prune.patch(model, "visionzip+transition", keep=(192, 64))
    vlm_prune.patch(model, "cls_attention+divprune", keep=(192, 64))
    vlm_prune.patch(model, "cls_attention:288+divprune:144+fastv:64:layer=1")

`build` makes the patch of a `PipelineConfig`: ONE vision-stage engine runs every vision stage
(each image reduced by the first, each later stage on what the one before passed on; the
sequence is compacted once, see `patches.vision_stage`); a pipeline of vision stages only is that
engine alone. With an in-LLM stage, `PipelinePatch` chains it after the vision-stage engine: the
in-LLM engine sees the compacted sequence as its prompt and drops more of the image tokens
inside the decoder. What the two share, and why:

- hook order: the vision engine's pre-hook of the inner model runs first (installed first), so
  the in-LLM engine's sees the compacted keyword arguments;
- which columns are image tokens: after compaction the inputs are embeddings, so the vision
  engine hands the in-LLM engine the image columns of each forward it compacted
  (`VisionStageEngine.visual_columns`); videos pass the in-LLM stage untouched, as they pass an
  in-LLM method alone;
- generate(): one wrapper chained over the other (each engine keeps its own per-call facts);
- the KV cache: each engine tags it with its own decisions, under its own attribute;
- labels: taken out once, gathered to the vision stage's columns, then to the columns the
  in-LLM stage's last layer holds;
- Qwen3-VL's DeepStack: the columns the decoder holds come from the in-LLM stage.

Refused: a prompt with images that continues a non-empty cache, assisted decoding.
"""

from __future__ import annotations

from typing import Any

import torch

from vlm_prune.registry import get_method

from .in_llm import LLMStageEngine
from .vision_stage import VisionStageEngine


def build(model: torch.nn.Module, config: Any, adapter_cls: Any) -> Any:
    """The patch of pipeline `config` (a `vlm_prune.pipeline_config.PipelineConfig`) on `model`:
    one `VisionStageEngine` running all its vision stages, chained with its in-LLM stage's
    `LLMStageEngine` in a `PipelinePatch` when it has one. Validates as the engines do (nothing
    is installed here)."""
    vision = [stage for stage in config.stages if get_method(stage.method).stage == "vision"]
    llm = [stage for stage in config.stages if get_method(stage.method).stage != "vision"]
    if len(llm) > 1 or (llm and config.stages[-1] is not llm[0]):
        raise ValueError(f"method={config.method!r}: a pipeline is one or more vision-stage methods, then at most "
                         "one in-LLM method")
    if not vision:
        return LLMStageEngine(model, llm[0], adapter_cls)
    engine = VisionStageEngine(model, vision[0] if len(vision) == 1 else vision, adapter_cls)
    return engine if not llm else PipelinePatch(engine, LLMStageEngine(model, llm[0], adapter_cls))


class PipelinePatch:
    """The vision-stage engine (all the vision stages) and the in-LLM engine installed as one
    patch; the handle reads the outcome through this object."""

    def __init__(self, vision: VisionStageEngine, llm: LLMStageEngine):
        if not isinstance(llm, LLMStageEngine):
            raise TypeError("PipelinePatch chains a vision-stage engine and an in-LLM engine; a pipeline of several "
                            "vision stages is one VisionStageEngine: build pipelines with "
                            "vlm_prune.patches.pipeline.build(model, config, adapter_cls)")
        self.vision, self.llm = vision, llm
        vision.downstream, llm.upstream = llm, vision
        llm.cache_attr = vision.cache_attr + "_llm_stage"

    def install(self) -> None:
        self.vision.install()
        try:
            self.llm.install()
        except BaseException:
            self.vision.remove()
            raise

    def remove(self) -> None:
        self.llm.remove()
        self.vision.remove()

    @property
    def stats(self) -> list[dict[str, int]]:
        """Per row: visual_tokens (before the pipeline), kept (after its last stage), and each
        stage's counts: after_vision (what reached the LLM), kept_per_stage (what each stage
        passed on, the vision stages' then the in-LLM one's), video tokens where present."""
        first, last = self.vision.stats, self.llm.stats
        out = []
        for row, before in enumerate(first):
            kept_vision = before["kept"]
            entry = dict(before)
            entry["after_vision"] = kept_vision
            if row < len(last) and last[row]["visual_tokens"]:
                # the in-LLM stage counts the image tokens it saw; video tokens pass it
                entry["kept"] = kept_vision - last[row]["visual_tokens"] + last[row]["kept"]
            vision = entry.pop("kept_per_stage", (kept_vision,))
            entry["kept_per_stage"] = (*vision, entry["kept"])
            out.append(entry)
        return out

    @property
    def kept_indices(self) -> list[torch.Tensor]:
        """Per image: the visual tokens the vision stages passed on to the LLM (indices into the
        image's original tokens; for merging methods, the slot each output token occupies)."""
        return self.vision.kept_indices

    @property
    def layer_lengths(self) -> list[int]:
        """Tokens each decoder layer processed in the last prefill: the in-LLM stage's count of
        the sequence the vision stage compacted."""
        return self.llm.layer_lengths or self.vision.layer_lengths

    @property
    def timings(self) -> dict[str, float]:
        timings = dict(self.vision.timings)
        for name, value in self.llm.timings.items():
            timings[f"llm_{name}"] = value
        return timings

    @property
    def state(self) -> Any:
        """The vision stage's prompt state (its compaction of the last prefill)."""
        return self.vision.state
