"""Saving a checkpoint in the layout vLLM 0.32 loads.

transformers 5.x saves the CLIP tower as `vision_tower.embeddings...` (5.24: with the rest in the
4.x layout, `language_model.model...`); vLLM 0.32 expects `vision_tower.vision_model.embeddings...`
(the transformers 4.x layout); the same for LLaVA-NeXT. transformers still loads that layout, so
one folder serves both.

Qwen2-VL / Qwen2.5-VL: the keys transformers 5.x writes are the ones vLLM maps, but vLLM builds
the stock `Qwen2VLProcessor` / `Qwen2_5_VLProcessor`, which needs a video processor config; an
image-only processor (`vlm_prune.processors.QwenImageOnlyProcessor`) saves none, so one is
written from the image processor's settings (the stock processor refuses to load without it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

_TOWER = re.compile(r"(^|\.)vision_tower\.(?!vision_model\.)")


def save_for_vllm(model, processor, path: str | Path) -> Path:
    """save_pretrained(model and processor) with the vision tower keys vLLM expects."""
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    if model.config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        _write_video_processor_config(processor, path)
    if model.config.model_type not in ("llava", "llava_next"):
        return path
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        renamed = {_TOWER.sub(r"\1vision_tower.vision_model.", key, count=1): value for key, value in tensors.items()}
        save_file(renamed, shard, metadata={"format": "pt"})
    return path


def _write_video_processor_config(processor, path: Path) -> None:
    target = path / "video_preprocessor_config.json"
    if target.exists() or getattr(processor, "video_processor", None) is not None:
        return
    image = processor.image_processor
    settings = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "patch_size": image.patch_size,
        "temporal_patch_size": image.temporal_patch_size,
        "merge_size": image.merge_size,
        "image_mean": list(image.image_mean),
        "image_std": list(image.image_std),
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
        "rescale_factor": image.rescale_factor,
        "do_sample_frames": False,
    }
    target.write_text(json.dumps(settings, indent=2) + "\n")
