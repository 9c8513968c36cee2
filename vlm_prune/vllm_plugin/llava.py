"""LLaVA-1.5 on vLLM (written against vLLM 0.32): fewer placeholder tokens, the kept embeddings.

Two overrides of vLLM's own classes, active only when the model config carries `vlm_prune`:
- processing info: `get_num_image_tokens` returns the pruned count, so the prompt gets that many
  image placeholders (vLLM fixes the count before the encoder runs, hence fixed budgets only);
- model: `_process_image_input` runs the tower with a hook on the scoring layer's fused qkv
  projection, then hands the features to the same reduction the transformers path uses
  (`vlm_prune.patches.image_tokens.reduce_in_stages` with the registered method, or a pipeline's
  vision stages in turn) and returns the kept embeddings. vLLM numbers placeholders
  consecutively, i.e. positions="renumber".
A pipeline of vision-stage methods (`"cls_attention+divprune"`): the processing info reserves the
last stage's count (`passed_on_count_in_stages`); the tower runs once, its hooks on the union of
the stages' score layers, and each stage gets its own signals (its layers, its needs).
vLLM builds the CLIP tower only up to the feature layer (hidden_states[-2] -> 23 of 24 layers), so
the layer producing the features is its last one; `layers=` may name layers up to it.
Tensor parallelism: each rank scores with its own heads and the head averages are all-reduced
(`vlm_prune.sharded_scores`), so every rank keeps the tokens one device keeps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImagePixelInputs,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..patches.image_tokens import ImageTokens, Region, passed_on_count_in_stages, reduce_in_stages
from ..sharded_scores import clip_signals
from ..vision_layers import resolve_score_layers
from .config import plugin_plan


def reserved_count(plan, regions: list[list], n_tokens: int) -> int:
    """The placeholders an image of n_tokens tokens gets: what the last stage passes on
    (regions: per stage, the image's regions as that stage sees them)."""
    count = passed_on_count_in_stages(plan.stages, regions, n_tokens)
    if count is None:  # the plugin's config check refuses what could lead here
        raise ValueError(f"vlm_prune: {plan.method!r} keeps a number of tokens that depends on the image; "
                         "vLLM needs a fixed count")
    return count


class PrunedLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n_tokens = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        plan = plugin_plan(self.get_hf_config(), "llava")
        if plan is None:
            return n_tokens
        side = math.isqrt(n_tokens)
        region = Region.span(0, n_tokens, (side, side), crop=0)
        return reserved_count(plan, [[region]] * len(plan.stages), n_tokens)


def _build_info(ctx):
    return PrunedLlavaProcessingInfo(ctx)


class ClipTowerScoring:
    """The [CLS]-attention signals of a CLIP tower built by vLLM, for the LLaVA model classes
    (mixed in before vLLM's class): hooks on the score layers' fused qkv projections."""

    def _init_pruning(self, family: str) -> None:
        self.prune_plan = plugin_plan(self.config, family)  # fails the engine start if invalid
        self.prune_config = None if self.prune_plan is None else self.prune_plan.config
        if self.prune_config is None:
            return
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError(f"vlm_prune on vLLM supports {family} with vision_feature_select_strategy='default'")
        layers = self.vision_tower.vision_model.encoder.layers
        # per stage, the layers its [CLS] row is summed over (none for a method without tower scores)
        self.stage_score_layers: list[tuple[int, ...]] = []
        for stage in self.prune_plan.stages:
            # vLLM builds the tower up to the feature layer: the last layer it runs produces the features
            self.stage_score_layers.append(resolve_score_layers(
                stage.config.options.get("layers"), self.config.vision_config.num_hidden_layers,
                len(layers) - 1, runs=len(layers), engine="vLLM")
                if stage.method.needs & {"cls_attention", "keys"} else ())
        self.score_layers = tuple(sorted(set().union(*self.stage_score_layers)))  # hooked once for all stages

    def _tower_with_signals(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """pixel_values [I, 3, H, W] (images or crops) -> (the tower's features [I, N, Dv], [CLS]
        dropped; per vision stage, its signals with the [CLS] token first: "cls_attention" [I, T]
        float32 summed over the stage's score layers, "keys" [I, T, Dh] of its last, heads
        averaged; and "cls_feature" [I, Dv], the [CLS] token's feature, for methods that need
        them)."""
        captured: dict[Any, torch.Tensor] = {}
        layers = self.vision_tower.vision_model.encoder.layers
        hooks = [
            layers[i].self_attn.qkv_proj.register_forward_hook(
                lambda module, args, output, i=i: captured.__setitem__(i, output[0]))
            for i in self.score_layers
        ]
        if "cls_feature" in self.prune_plan.needs:  # vLLM's tower ends at the feature layer
            hooks.append(layers[-1].register_forward_hook(
                lambda module, args, output: captured.__setitem__("cls", _hidden(output)[:, 0])))
        try:
            features = self._image_pixels_to_features(self.vision_tower, pixel_values)
        finally:
            for hook in hooks:
                hook.remove()
        common = {"cls_feature": captured["cls"]} if "cls" in captured else {}  # full width on every rank
        per_stage = []
        for stage, score_layers in zip(self.prune_plan.stages, self.stage_score_layers):
            signals = dict(common)
            per_stage.append(signals)
            if not score_layers:
                continue
            # under tensor parallelism each rank's qkv output holds [q | k | v] of its own heads:
            # the head averages are all-reduced over the group (vlm_prune.sharded_scores)
            attn = layers[score_layers[0]].self_attn
            signals["cls_attention"], keys = clip_signals(
                [captured[i] for i in score_layers], attn.num_heads_per_partition, attn.num_heads, attn.head_dim,
                tensor_model_parallel_all_reduce if attn.tp_size > 1 else None,
                keys="keys" in stage.method.needs, backend=stage.config.backend)
            if keys is not None:  # heads averaged, as on transformers
                signals["keys"] = keys
        return features, per_stage


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlavaForConditionalGeneration(ClipTowerScoring, LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning("llava")

    def _process_image_input(self, image_input) -> Any:
        if self.prune_config is None or not isinstance(image_input, LlavaImagePixelInputs):
            return super()._process_image_input(image_input)
        pre_projection, per_stage = self._tower_with_signals(image_input["pixel_values"])  # [I, N, Dv]
        features = self.multi_modal_projector(pre_projection)
        n_tokens = features.shape[1]
        side = math.isqrt(n_tokens)
        region = Region.span(0, n_tokens, (side, side), features.device, crop=0)
        described = []  # per stage: the images with that stage's signals
        for signals in per_stage:
            cls_feature = signals.get("cls_feature")
            described.append([
                ImageTokens(features[i], [region], {name: value[i, 1:] for name, value in signals.items()
                                                    if name != "cls_feature"} | {"pre_projection": pre_projection[i]},
                            {"cls_feature": cls_feature[i:i + 1]} if cls_feature is not None else {})
                for i in range(features.shape[0])
            ])
        return reduce_in_stages(self.prune_plan.stages, described, project=self.multi_modal_projector).features


def _hidden(output: Any) -> torch.Tensor:
    """An encoder layer's output hidden states (some releases return a tuple)."""
    return output[0] if isinstance(output, tuple) else output
