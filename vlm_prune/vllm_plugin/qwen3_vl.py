"""Qwen3-VL and Qwen3-VL-MoE on vLLM (written against vLLM 0.32): the Qwen2-VL plugin's machinery
(`vlm_prune.vllm_plugin.qwen2_vl`) with the DeepStack levels carried along.

Active only when the model config carries `vlm_prune` (--hf-overrides or $VLM_PRUNE); without it
every override defers to vLLM's own class. Images and videos are pruned.

What is the same as on Qwen2-VL / 2.5-VL (shared code, not repeated here): the processor emits
the pruned placeholder count per image (fixed before the encoder runs: fixed budgets only); the
[CLS]-free score is the attention each patch receives in the last vision block (Qwen3's vision
attention is Qwen2.5-VL's class, with no window permutation), read where the block rotates q and
k, so tensor parallelism all-reduces the head averages as there (`vlm_prune.sharded_scores`);
the kept tokens keep their ORIGINAL M-RoPE positions (`positions="original"`; `"renumber"` for
methods whose output is a coarse grid), carried as 6 base-256 position channels and written by
`recompute_mrope_positions`; text after an image continues from the image's full extent.

DeepStack: vLLM's Qwen3 tower returns, per merged token, the main embedding and one feature per
DeepStack level concatenated along the channels ([T / 4, D * (1 + levels)]); the model splits
them again when it builds the input embeddings and adds level i after decoder layer i at the
image tokens. Here the levels are split off (`_split_streams`) and reduced as token streams of
the shared reduction (`reduce_image_tokens` -> `follow_reduction`): a kept token's levels are its
own rows, a merged token's levels are the same merge of the levels (the transformers path does
exactly this, patches/adapters/qwen3_vl.py). What the model returns per image is
[K, D * (1 + levels) + 6]: kept embeddings, their levels, their positions, the layout vLLM's
Qwen3 splits once the position channels are stripped.

Videos are pruned with the same reduction (regions as on the transformers path, `video_regions`),
their DeepStack levels following it. Qwen3 numbers each video frame as its own run of
placeholders after a timestamp text: under video_budget="per_frame" each frame's run holds its
own pruned count, the layout of the transformers path; under "per_video" (`evs`) a frame's share
is known only after the encoder, so the first frame's run holds all the video's kept tokens and
the later frames' runs are empty (the layout of vLLM's own EVS). Kept tokens keep their unpruned
positions either way (`_placed`), but under "per_video" the later frames' timestamp text comes
after the tokens in the sequence, where the transformers path leaves it between them. A pipeline
of vision stages lays a video out as "per_video" as soon as one of its stages pools the video
(`PluginPlan.video_in_one_pool`), else per frame.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY

from .qwen2_vl import _PrunedPromptUpdates, _PrunedQwenMixin, pruned_video_frames


class PrunedQwen3VLMultiModalProcessor(_PrunedPromptUpdates, Qwen3VLMultiModalProcessor):
    def _pruned_video(self, item_idx: int, original, plan, merge: int, out_mm_kwargs):
        """A video's replacement: per frame its timestamp text and a vision run of the frame's
        pruned count (all the video's tokens in the first run under video_budget="per_video"),
        built by vLLM's own `get_video_repl` with the embeddings at the video tokens only."""
        item = out_mm_kwargs["video"][item_idx]
        hf_config = self.info.get_hf_config()
        return Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=pruned_video_frames(plan, item["video_grid_thw"].data.tolist(), merge),
            timestamps=item["timestamps"].data, tokenizer=self.info.get_tokenizer(),
            vision_start_token_id=hf_config.vision_start_token_id, vision_end_token_id=hf_config.vision_end_token_id,
            video_token_id=hf_config.video_token_id, select_token_id=True)


class _PrunedQwen3Mixin(_PrunedQwenMixin):
    """What Qwen3-VL (dense and MoE) changes in the shared Qwen model side."""

    def _run_tower(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values, grid_thw=grid_thw)

    def _split_streams(self, embeds: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """[T / 4, D * (1 + levels)] -> ([T / 4, D], levels x [T / 4, D]): the main embeddings and
        the DeepStack levels, in the order vLLM's Qwen3 concatenates (and later splits) them."""
        main, *levels = embeds.split(self.visual_dim, dim=-1)
        if len(levels) != self.deepstack_num_level:
            raise ValueError(f"vlm_prune: {embeds.shape[-1]} channels per visual token; expected "
                             f"{self.visual_dim} x (1 + {self.deepstack_num_level} DeepStack levels)")
        return main, levels

    def _media_runs(self, input_tokens, mm_features):
        """(feature, offset, count, t, h, w, t_factor) per run of consecutive media placeholders, in
        prompt order; (t, h, w) the unpruned grid in merged tokens. An image is one run (its
        placeholder count is the pruned one, read from the feature); a video is one run per
        frame (t = 1, `count` its pruned placeholders, 0 in the later frames of a "per_video"
        budget), found after each frame's timestamp text by vLLM's own walk (`_iter_mm_grid_hw`)."""
        config = self.config
        merge = config.vision_config.spatial_merge_size
        tokens = None
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality == "image":
                t, h, w = feature.data["image_grid_thw"].data.tolist()
                yield feature, feature.mm_position.offset, feature.mm_position.length, t, h // merge, w // merge, 1.0
                continue
            tokens = list(input_tokens) if tokens is None else tokens
            for offset, rows, cols, count in self._iter_mm_grid_hw(
                    tokens, [feature], video_token_id=config.video_token_id,
                    vision_start_token_id=config.vision_start_token_id,
                    vision_end_token_id=config.vision_end_token_id, spatial_merge_size=merge):
                yield feature, offset, count, 1, rows, cols, 1.0

    def _frame_coordinate(self, frames: torch.Tensor, media_input, item: int) -> torch.Tensor:
        """Qwen3 numbers each frame as an image after its own timestamp: the temporal channel
        carries the frame index, which `_placed` turns into that frame's base."""
        return frames

    def _placed(self, ids, positions, is_media, start, coords, video):
        """Images as on Qwen2-VL. A video's kept token of frame f at (h, w) goes to base_f +
        (0, h, w), base_f following frame f's `<|vision_start|>` (text: its position is the
        unpruned model's). The rows' first placeholder sits in the run of frame f0 (that of the
        first row; the first frame's under a "per_video" budget, whose run holds the video's
        tokens); the frames' vision starts are counted from that run's on."""
        if not video:
            return super()._placed(ids, positions, is_media, start, coords, video)
        run_start = start
        while run_start > 0 and bool(is_media[run_start - 1]):
            run_start -= 1
        frames = coords[0].cpu()
        first = 0 if self.prune_plan.video_in_one_pool else int(frames[0])
        starts = (ids[run_start - 1:] == self.config.vision_start_token_id).nonzero().flatten() + run_start - 1
        bases = positions[0, starts[:int(frames.max()) - first + 1].to(positions.device)].cpu() + 1
        placed = coords.clone()
        placed[0] = 0
        return placed + bases[frames - first].to(placed.device)


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen3VLMultiModalProcessor, info=Qwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class PrunedQwen3VLForConditionalGeneration(_PrunedQwen3Mixin, Qwen3VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen3VLMultiModalProcessor, info=Qwen3VLMoeProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class PrunedQwen3VLMoeForConditionalGeneration(_PrunedQwen3Mixin, Qwen3VLMoeForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning(vllm_config)
