"""LLaVA-NeXT on vLLM (written against vLLM 0.32): fewer placeholder tokens, the kept embeddings.

The same two overrides as LLaVA-1.5 (`llava.py`), over the anyres layout of the transformers
path (`vlm_prune.patches.adapters.llava_next.PackedLayout`: the base image, the unpadded crop grid and
one `image_newline` per grid row, which is always kept):
- processing info: `get_num_image_tokens` returns the pruned count for the image's size, from
  the layout of that size (`budget="per_image"` or `"per_crop"`, as in transformers);
- model: `_process_image_input` runs the tower over all crops with the scoring hooks, packs the
  features with vLLM's own merge (as the unpruned model does) and the signals with the layout,
  and returns what `reduce_images` keeps of each image. Positions: "renumber" (vLLM numbers
  placeholders consecutively).
A pipeline of vision-stage methods: each stage sees the images through the layout of its own
budget policy, and the processing info reserves what the last stage passes on; a later stage's
policy may not be finer than an earlier one's (`config._check_later_budgets`: its count would
depend on the image).
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImagePixelInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..patches.adapters.llava_next import PackedLayout
from ..patches.image_tokens import reduce_in_stages
from .config import plugin_plan
from .llava import ClipTowerScoring, reserved_count

FAMILY = "llava_next"


def _layout(config, sizes: list[tuple[int, int]], budget: str, device: torch.device | str) -> PackedLayout:
    """The packed layout of images of `sizes` ((height, width) each), made once per set of sizes:
    vLLM serves many requests with the same image sizes."""
    vision = config.vision_config
    pinpoints = tuple(tuple(p) for p in config.image_grid_pinpoints)
    return _cached_layout(pinpoints, vision.image_size, vision.patch_size, tuple(sizes), budget, str(device))


@functools.lru_cache(maxsize=256)
def _cached_layout(pinpoints, image_size: int, patch_size: int, sizes, budget: str, device: str) -> PackedLayout:
    # the layout reads only these config fields (HF configs are not hashable)
    config = types.SimpleNamespace(image_grid_pinpoints=[list(p) for p in pinpoints],
                                   vision_config=types.SimpleNamespace(image_size=image_size, patch_size=patch_size))
    return PackedLayout.of(config, [list(s) for s in sizes], budget, torch.device(device))


class PrunedLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n_tokens = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        hf_config = self.get_hf_config()
        plan = plugin_plan(hf_config, FAMILY)
        if plan is None:
            return n_tokens
        # each stage's regions after its budget policy
        layouts = [_layout(hf_config, [(image_height, image_width)], stage.budget, "cpu") for stage in plan.stages]
        if layouts[0].lengths[0] != n_tokens:  # vLLM's and transformers' anyres arithmetic disagree
            raise ValueError(f"vlm_prune: a {image_width}x{image_height} image gives {n_tokens} tokens in vLLM "
                             f"but {layouts[0].lengths[0]} in transformers' packing")
        return reserved_count(plan, [layout.regions[0] for layout in layouts], n_tokens)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=PrunedLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlavaNextForConditionalGeneration(ClipTowerScoring, LlavaNextForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning(FAMILY)

    def _process_image_input(self, image_input) -> Any:
        if self.prune_config is None or not isinstance(image_input, LlavaNextImagePixelInputs):
            return super()._process_image_input(image_input)
        if image_input.get("image_sizes") is None:  # the processor always gives them; the count needs them
            raise ValueError("vlm_prune on LLaVA-NeXT needs image_sizes with the pixel values")
        sizes = [tuple(size) for size in image_input["image_sizes"].tolist()]
        config, vision = self.config, self.config.vision_config
        # each image's crops (base view first); a stacked batch may pad them to the same count
        n_crops = [image_size_to_num_patches(size, config.image_grid_pinpoints, vision.image_size) for size in sizes]
        pixels = torch.cat([image[:n] for image, n in zip(image_input["pixel_values"], n_crops)])
        pre_projection, per_stage = self._tower_with_signals(pixels)  # [C, side^2, Dv]; signals [CLS] first
        projected = self.multi_modal_projector(pre_projection)
        # the features packed by vLLM's own merge, as the unpruned model does
        features = [self._merge_image_patch_embeddings(image_input["image_sizes"][i], crops, strategy="spatial_unpad")
                    for i, crops in enumerate(projected.split(n_crops))]
        described = []  # per stage: the images in the layout of its budget policy, with its signals
        for stage, signals in zip(self.prune_plan.stages, per_stage):
            if stage.method.uses_pre_projection:
                signals["pre_projection"] = pre_projection
            described.append(_layout(config, sizes, stage.budget, projected.device).images(features, signals))
        return reduce_in_stages(self.prune_plan.stages, described, project=self.multi_modal_projector).features
