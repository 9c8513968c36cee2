"""Saving a checkpoint in the layout vLLM 0.32 loads.

transformers 5.x saves the CLIP tower as `vision_tower.embeddings...` (5.24: with the rest in the
4.x layout, `language_model.model...`); vLLM 0.32 expects `vision_tower.vision_model.embeddings...`
(the transformers 4.x layout); the same for LLaVA-NeXT. transformers still loads that layout, so
one folder serves both.

Qwen2-VL / Qwen2.5-VL / Qwen3-VL (+ MoE) / Qwen3.5 (+ MoE): the keys transformers 5.x writes are
the ones vLLM maps, but vLLM builds the stock processor (`Qwen2VLProcessor`,
`Qwen2_5_VLProcessor`, `Qwen3VLProcessor`), which needs a video processor config; an image-only
processor (`vlm_prune.processors.QwenImageOnlyProcessor` / `Qwen3ImageOnlyProcessor`) saves none,
so one is written from the image processor's settings (the stock processor refuses to load
without it).

Qwen3-VL-MoE, on top: transformers 5.24 keeps each layer's experts fused as `gate_up_proj`
[experts, 2 * intermediate, hidden] and `down_proj` [experts, hidden, intermediate] (the
orientation of an nn.Linear weight) and saves them so; vLLM 0.32 reads this model's fused
experts as the original release stores them, transposed ([experts, hidden, 2 * intermediate] and
[experts, intermediate, hidden]: its loader transposes the last two dims back). transformers 5.24
reads the released layout too, but it transposes a tensor on load only where its shape differs
from its parameter's: where a matrix is square (gate_up_proj when 2 * intermediate == hidden,
down_proj when intermediate == hidden, as in `vlm_prune.tiny.qwen3_vl(moe=True)`) it loads it
untransposed, i.e. wrong. Load such a model in transformers from a plain `save_pretrained`
folder. vLLM also reads `norm_topk_prob` from the text config, which transformers'
Qwen3-VL-MoE config no longer carries (its router always renormalises the top-k weights): the
saved config gets `norm_topk_prob: true`, what transformers computes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

_TOWER = re.compile(r"(^|\.)vision_tower\.(?!vision_model\.)")
_FUSED_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
# model_type -> the video processor class vLLM's stock processor expects
_VIDEO_PROCESSORS = {
    "qwen2_vl": "Qwen2VLVideoProcessor",
    "qwen2_5_vl": "Qwen2VLVideoProcessor",
    "qwen3_vl": "Qwen3VLVideoProcessor",
    "qwen3_vl_moe": "Qwen3VLVideoProcessor",
    "qwen3_5": "Qwen3VLVideoProcessor",  # Qwen3.5 checkpoints ship Qwen3-VL's processor
    "qwen3_5_moe": "Qwen3VLVideoProcessor",
}


def save_for_vllm(model, processor, path: str | Path) -> Path:
    """save_pretrained(model and processor) in the layout vLLM 0.32 loads (and transformers too).

    processor=None saves the model alone (vLLM then needs the processor's files saved beside it,
    and on Qwen the video processor config this function writes from the processor)."""
    path = Path(path)
    model.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    model_type = model.config.model_type
    if model_type in _VIDEO_PROCESSORS and processor is not None:
        write_video_processor_config(processor, path, _VIDEO_PROCESSORS[model_type])
    if model_type == "qwen3_vl_moe":
        _rewrite_shards(path, _transpose_fused_experts)
        _set_text_config(path, norm_topk_prob=True)
    if model_type in ("llava", "llava_next"):
        _rewrite_shards(path, lambda tensors: {
            _TOWER.sub(r"\1vision_tower.vision_model.", key, count=1): value for key, value in tensors.items()})
    return path


def write_video_processor_config(processor, path: str | Path, processor_type: str = "Qwen2VLVideoProcessor") -> None:
    """Writes `video_preprocessor_config.json` (class `processor_type`) from the image processor's
    settings, its pixel bounds included (the stock video processor's default minimum, 128 x 28 x 28
    px, would enlarge small frames that transformers' offline inputs keep), unless the folder has
    one or the processor has a video processor of its own."""
    target = Path(path) / "video_preprocessor_config.json"
    if target.exists() or getattr(processor, "video_processor", None) is not None:
        return
    image = processor.image_processor
    settings = {
        "video_processor_type": processor_type,
        "patch_size": image.patch_size,
        "temporal_patch_size": image.temporal_patch_size,
        "merge_size": image.merge_size,
        "image_mean": list(image.image_mean),
        "image_std": list(image.image_std),
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
        "rescale_factor": image.rescale_factor,
        "do_sample_frames": False,
    }
    size = getattr(image, "size", None)
    if getattr(size, "shortest_edge", None) is not None:
        settings["size"] = {"shortest_edge": size.shortest_edge, "longest_edge": size.longest_edge}
    target.write_text(json.dumps(settings, indent=2) + "\n")


def _rewrite_shards(path: Path, convert) -> None:
    """Applies `convert` (dict of tensors -> dict of tensors) to every safetensors shard in place."""
    for shard in path.glob("*.safetensors"):
        save_file(convert(load_file(shard)), shard, metadata={"format": "pt"})


def _transpose_fused_experts(tensors: dict) -> dict:
    """gate_up_proj [E, 2I, H] -> [E, H, 2I] and down_proj [E, H, I] -> [E, I, H] (see the module
    docstring); every other tensor unchanged."""
    return {key: value.transpose(1, 2).contiguous() if _FUSED_EXPERTS.search(key) else value
            for key, value in tensors.items()}


def _set_text_config(path: Path, **entries) -> None:
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"].update(entries)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
