"""A pipeline: a vision-stage method, then an in-LLM method, on one model instance.

    vlm_prune.patch(model, "visionzip+transition", keep=(192, 64))

The vision-stage engine reduces each image before the LLM runs (the sequence is compacted); the
in-LLM engine then sees that compacted sequence as its prompt and drops more of the image tokens
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

from .in_llm import LLMStageEngine
from .vision_stage import VisionStageEngine


class PipelinePatch:
    """Two engines installed as one patch; the handle reads the outcome through this object."""

    def __init__(self, vision: VisionStageEngine, llm: LLMStageEngine):
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
        stage's counts: after_vision (what reached the LLM), video tokens where present."""
        first, last = self.vision.stats, self.llm.stats
        out = []
        for row, before in enumerate(first):
            kept_vision = before["kept"]
            entry = dict(before)
            entry["after_vision"] = kept_vision
            if row < len(last) and last[row]["visual_tokens"]:
                # the in-LLM stage counts the image tokens it saw; video tokens pass it
                entry["kept"] = kept_vision - last[row]["visual_tokens"] + last[row]["kept"]
            out.append(entry)
        return out

    @property
    def kept_indices(self) -> list[torch.Tensor]:
        """Per image: the visual tokens the vision stage passed on (indices into the image's
        tokens; for merging methods, what each output token stands for)."""
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
