"""Saving a LLaVA checkpoint in the layout vLLM 0.32 loads.

transformers 5.x saves the CLIP tower as `vision_tower.embeddings...` (5.24: with the rest in the
4.x layout, `language_model.model...`); vLLM 0.32 expects `vision_tower.vision_model.embeddings...`
(the transformers 4.x layout). transformers still loads that layout, so one folder serves both.
"""

from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import load_file, save_file

_TOWER = re.compile(r"(^|\.)vision_tower\.(?!vision_model\.)")


def save_for_vllm(model, processor, path: str | Path) -> Path:
    """save_pretrained(model and processor) with the vision tower keys vLLM expects."""
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    if model.config.model_type != "llava":
        return path
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        renamed = {_TOWER.sub(r"\1vision_tower.vision_model.", key, count=1): value for key, value in tensors.items()}
        save_file(renamed, shard, metadata={"format": "pt"})
    return path
