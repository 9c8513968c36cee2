"""Qwen2-VL and Qwen2.5-VL on vLLM (written against vLLM 0.32): fewer image placeholders, the kept
embeddings at their ORIGINAL M-RoPE positions (positions="original", as `vlm_prune.patch` does).

Active only when the model config carries `vlm_prune` (--hf-overrides or $VLM_PRUNE); without it
every override below defers to vLLM's own class. Images and videos are pruned.

- processor: each image's and video's prompt replacement emits the pruned count
  (method.output_count over the item's regions), fixed before the encoder runs (hence fixed
  budgets only; `evs` counts max(h w, floor(N keep)) per video, fixed too);
- `get_mrope_input_positions`: the prompt's positions as the unpruned model numbers them. Text
  after an image or a video continues from the item's full (t, h, w) extent, exactly as unpruned
  (this replaces vLLM's EVS numbering, whose text offset is llm_grid_w, not the extent). The
  item's own placeholders get a provisional position (the item's base) until the encoder has run;
- `_process_image_input` / `_process_video_input` (`_process_media`): runs the tower with hooks
  on the last block (the [CLS]-free score: the attention each patch receives, averaged over
  heads and its item's query rows, then over each 2x2 merge unit, Qwen2.5-VL's window
  permutation undone; keys for VisionZip -- the same
  definitions as patches/qwen2_vl.py), reduces with the SHARED `reduce_in_stages` (a video's
  regions: its frames, or one (t, h, w) region under video_budget="per_video", as the
  transformers adapter makes them: `video_regions`), and returns
  the kept embeddings with 6 extra channels: each kept token's (t, h, w) grid coordinate (a
  video's t scaled by second_per_grid_ts * tokens_per_second, as vLLM numbers it), split as
  (v // 256, v % 256) so no channel exceeds 255 (exact in bf16 / fp16). Other per-token streams
  the tower returns beside the embeddings (Qwen3-VL's DeepStack levels, `_split_streams`) are
  reduced with the embeddings' decisions and returned in their channels;
- `recompute_mrope_positions`: strips the channels and writes base + (t, h, w) at the kept
  tokens' placeholders (chunked prefill aware); text positions are never touched, so the
  decode offset (mrope_position_delta) equals the unpruned model's.

vLLM only calls `recompute_mrope_positions` when its runner's `is_multimodal_pruning_enabled` is
set, which vLLM 0.32 ties to video EVS (and its CPU runner never sets at all). The model installs
`_enable_position_recompute`: a small, idempotent wrapper on the V1 runner that sets the flag for
models that ask for it (only ours, only when pruning is on).

Across devices: under tensor parallelism each rank scores with its own vision heads (captured
where the block rotates q and k, after Qwen2-VL's `split_qkv`) and the head averages are
all-reduced (`vlm_prune.sharded_scores`), so every rank keeps the tokens one device keeps. Under
pipeline parallelism only the first stage runs the encoder and the position recompute: the
model passes the first stage's positions to the later stages with the hidden states.

A pipeline of vision-stage methods: every stage reduces each image and video in turn
(`reduce_in_stages`; one tower run, the union of the stages' signals), the processor reserves
the last stage's count (`passed_on_count_in_stages`), positions are original (the policy every
stage keeps).

Limits: the V1 model runner only (V2 builds its own pruning state from EVS settings); image
placeholders must follow a text token (`<|vision_start|>`, as vLLM's own EVS also assumes);
vLLM's own video pruning (--video-pruning-rate) and vlm_prune would prune the same videos: the
combination is a start-up error.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.sequence import IntermediateTensors
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from ..patches.adapters.qwen2_vl import QWEN_SCORED_BY, merge_unit_mean
from ..patches.image_tokens import ImageTokens, Region, passed_on_count_in_stages, reduce_in_stages, video_regions
from ..sharded_scores import keys_over_heads, received_attention
from ..vision_layers import refuse_layers
from .config import ENV_VAR, PluginPlan, plugin_plan
from .llava import reserved_count

FAMILY = "qwen2_vl"
POSITION_CHANNELS = 6  # (t, h, w), each as (high, low) base-256 digits
PP_POSITIONS = "vlm_prune_positions"  # the first pipeline stage's positions, sent with the hidden states
_DIGIT = 256


# -- counts (shared by the processor and the model) -------------------------------------------


def pruned_image_tokens(plan: PluginPlan, grid_thw: Sequence[int], merge: int) -> int:
    """Placeholders an image of patch grid (1, h, w) gets: what the plan's stages pass on of
    its (h / merge) x (w / merge) token grid (one region, as in patches/qwen2_vl.py)."""
    t, h, w = (int(v) for v in grid_thw)
    if t != 1:
        raise ValueError(f"vlm_prune on vLLM: an image with {t} temporal patches is not supported")
    rows, cols = h // merge, w // merge
    return reserved_count(plan, [[Region.span(0, rows * cols, (rows, cols))]] * len(plan.stages), rows * cols)


def pruned_video_frames(plan: PluginPlan, grid_thw: Sequence[int], merge: int) -> list[int]:
    """Placeholders per frame of a video of patch grid (t, h, w) (t frames of (h / merge) x
    (w / merge) tokens; regions as the transformers path makes them, `video_regions`).
    video_budget="per_frame" in every stage: each frame's count. A stage with "per_video"
    (evs): the video's count, all in the first frame and 0 in the others -- how many of each
    frame stay is known only once the encoder ran (vLLM's own EVS lays its tokens out the same
    way)."""
    t, h, w = (int(v) for v in grid_thw)
    rows, cols = h // merge, w // merge
    if plan.video_in_one_pool:
        regions, budgets = zip(*(video_regions(t, rows, cols, stage.config.video_policy == "per_video")
                                 for stage in plan.stages))
        return [_video_count(plan, list(regions), t * rows * cols, list(budgets))] + [0] * (t - 1)
    frame = [Region.span(0, rows * cols, (rows, cols))]  # each frame alone, budgeted as a crop
    return [_video_count(plan, [frame] * len(plan.stages), rows * cols, ["per_crop"] * len(plan.stages))] * t


def _video_count(plan: PluginPlan, regions: list, n_tokens: int, budgets: list[str]) -> int:
    count = passed_on_count_in_stages(plan.stages, regions, n_tokens, budgets)
    if count is None:  # the plugin's config check refuses what could lead here
        raise ValueError(f"vlm_prune: {plan.method!r} keeps a number of video tokens that depends on the video; "
                         "vLLM needs a fixed count")
    return count


def encode_positions(coords: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[K, 3] int -> [K, 6] channels (high, low digits) exact in any float dtype."""
    if coords.numel() and int(coords.max()) >= _DIGIT * _DIGIT:
        raise ValueError("vlm_prune: image grid too large to carry positions")
    return torch.cat([coords // _DIGIT, coords % _DIGIT], dim=1).to(dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """[K, 6] -> [3, K] int64."""
    digits = channels.float().round().long()
    return (digits[:, :3] * _DIGIT + digits[:, 3:]).T


# -- processor --------------------------------------------------------------------------------


class _PrunedPromptUpdates:
    """Mixin for the multimodal processors: an image's and a video's replacement have the pruned
    count (Qwen2-VL / 2.5-VL: a video is one run of placeholders)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_config = self.info.get_hf_config()
        plan = plugin_plan(hf_config, FAMILY)
        if plan is None:
            return updates
        merge = hf_config.vision_config.spatial_merge_size

        def pruned(item_idx: int, original):
            tokens = original(item_idx)
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            return tokens[:1] * pruned_image_tokens(plan, grid.tolist(), merge)

        replacements = {"image": pruned,
                        "video": partial(self._pruned_video, plan=plan, merge=merge, out_mm_kwargs=out_mm_kwargs)}
        return [
            PromptReplacement(modality=u.modality, target=u.target,
                              replacement=partial(replacements[u.modality], original=u.replacement))
            if u.modality in replacements else u
            for u in updates
        ]

    def _pruned_video(self, item_idx: int, original, plan: PluginPlan, merge: int, out_mm_kwargs):
        """A video's replacement: one run of its pruned count."""
        tokens = original(item_idx)
        grid = out_mm_kwargs["video"][item_idx]["video_grid_thw"].data
        return tokens[:1] * sum(pruned_video_frames(plan, grid.tolist(), merge))


class PrunedQwen2VLMultiModalProcessor(_PrunedPromptUpdates, Qwen2VLMultiModalProcessor):
    pass


class PrunedQwen2_5_VLMultiModalProcessor(_PrunedPromptUpdates, Qwen2_5_VLMultiModalProcessor):
    pass


def _optional_field(inputs, name: str):
    """An optional field of vLLM's parsed multimodal input (a TensorSchema), or None."""
    try:
        return inputs[name]
    except (KeyError, AttributeError):
        return None


# -- the runner flag (vLLM 0.32) --------------------------------------------------------------


def _enable_position_recompute() -> None:
    """vLLM 0.32's V1 runner calls `model.recompute_mrope_positions` only when its
    `is_multimodal_pruning_enabled` is set: `GPUModelRunner.load_model` sets it for video EVS
    only, `CPUModelRunner.load_model` never. Wrap `_gather_mm_embeddings` (the one reader, shared
    by both runners) so runners whose model sets `vlm_prune_recomputes_positions` get the flag.
    Installed once per process, only when a model with pruning on is built; other models are
    untouched."""
    from vllm.v1.worker import gpu_model_runner

    runner_cls = gpu_model_runner.GPUModelRunner
    original = getattr(runner_cls, "_gather_mm_embeddings", None)
    if original is None:
        raise RuntimeError("vlm_prune: this vLLM's model runner has no _gather_mm_embeddings (written for vLLM 0.32)")
    if getattr(original, "_vlm_prune_wrapper", False):
        return

    def _gather_mm_embeddings(self, *args, **kwargs):
        if not self.is_multimodal_pruning_enabled and getattr(self.get_model(), "vlm_prune_recomputes_positions", False):
            self.is_multimodal_pruning_enabled = True
        return original(self, *args, **kwargs)

    _gather_mm_embeddings._vlm_prune_wrapper = True
    _gather_mm_embeddings.__wrapped__ = original
    runner_cls._gather_mm_embeddings = _gather_mm_embeddings


# -- model ------------------------------------------------------------------------------------


class _PrunedQwenMixin:
    """The model side, shared by Qwen2-VL and Qwen2.5-VL (the towers differ in the window
    permutation and in how `visual` takes grid_thw)."""

    windowed = False
    prune_config = None
    prune_plan = None

    def _init_pruning(self, vllm_config) -> None:
        self.prune_plan = plugin_plan(self.config, FAMILY)  # fails the engine start if invalid
        self.prune_config = None if self.prune_plan is None else self.prune_plan.config
        if self.prune_config is None:
            return
        if self.multimodal_config.is_multimodal_pruning_enabled():
            # both would prune the same videos (and vLLM's lays out and numbers them its own way)
            raise ValueError(
                f"vlm_prune ({self.prune_config.method!r}, from --hf-overrides '{{\"vlm_prune\": ...}}' or "
                f"${ENV_VAR}) prunes this model's videos, and vLLM's own video pruning is on too "
                f"(--video-pruning-rate {self.multimodal_config.video_pruning_rate}); use one of the two: drop "
                "--video-pruning-rate (vlm_prune's `evs` with keep = 1 - q keeps the tokens vLLM's EVS keeps) or "
                "the vlm_prune entry")
        if getattr(vllm_config, "use_v2_model_runner", False):
            raise ValueError("vlm_prune on Qwen-VL needs vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0")
        self.needs_tower = bool(self.prune_plan.needs & {"cls_attention", "keys"})
        for stage in self.prune_plan.stages:
            refuse_layers(stage.config.options.get("layers"), "Qwen-VL", QWEN_SCORED_BY)
        self.vlm_prune_recomputes_positions = True
        _enable_position_recompute()
        self.sends_positions = vllm_config.parallel_config.pipeline_parallel_size > 1
        if self.sends_positions:
            empty = self.make_empty_intermediate_tensors  # vLLM sets it per instance

            def make_empty_intermediate_tensors(batch_size: int, dtype: torch.dtype, device) -> IntermediateTensors:
                tensors = empty(batch_size, dtype, device)
                tensors[PP_POSITIONS] = torch.zeros((batch_size, 3), dtype=torch.int64, device=device)
                return tensors

            self.make_empty_intermediate_tensors = make_empty_intermediate_tensors

    # -- pipeline parallelism -----------------------------------------------------------------

    sends_positions = False

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        """vLLM 0.32 runs the encoder and `recompute_mrope_positions` on the first pipeline stage
        only: the later stages' runners hold the provisional positions of the kept image tokens.
        With pruning on and --pipeline-parallel-size > 1 the first stage sends its positions
        with the hidden states ([tokens, 3] int64) and every later stage uses them."""
        if self.sends_positions:
            if intermediate_tensors is not None and PP_POSITIONS in intermediate_tensors.tensors:
                tensors = dict(intermediate_tensors.tensors)
                positions = tensors.pop(PP_POSITIONS)[:positions.shape[-1]].T.to(positions.dtype)
                intermediate_tensors = IntermediateTensors(tensors)
        out = super().forward(input_ids=input_ids, positions=positions, intermediate_tensors=intermediate_tensors,
                              inputs_embeds=inputs_embeds, **kwargs)
        if self.sends_positions and isinstance(out, IntermediateTensors):  # not the last stage
            out[PP_POSITIONS] = positions.T.contiguous()
        return out

    # encoder CUDA graphs bypass embed_multimodal's output format (as vLLM does for EVS)
    def get_encoder_cudagraph_config(self):
        config = super().get_encoder_cudagraph_config()
        if self.prune_config is None:
            return config
        return dataclasses.replace(config, modalities=[])

    # -- positions ----------------------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.prune_config is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        pieces: list[np.ndarray] = []
        st = 0
        next_position = 0
        for feature, offset, count, t, h, w, t_factor in self._media_runs(input_tokens, mm_features):
            text_len = offset - st
            pieces.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_position)
            base = next_position + text_len
            if self.prune_plan.positions == "renumber":  # the text continues after the coarse grid
                h, w = self._reduced_grid(h, w)
            grid = np.indices((t, h, w))
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            # images and videos alike: the placeholders wait for recompute_mrope_positions
            pieces.append(np.full((3, count), base, dtype=np.int64))
            next_position = base + int(grid.max()) + 1  # the item's extent (unpruned, or its coarse grid)
            st = offset + count
        if st < len(input_tokens):
            text_len = len(input_tokens) - st
            pieces.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_position)
            next_position += text_len
        positions = np.concatenate(pieces, axis=1).reshape(3, -1).astype(np.int64)
        return torch.from_numpy(positions), next_position - len(input_tokens)

    def _media_runs(self, input_tokens, mm_features):
        """(feature, offset, count, t, h, w, t_factor) per run of consecutive media placeholders, in
        prompt order: its first placeholder, how many there are (pruned), the item's unpruned
        grid in merged tokens and its temporal scale. Qwen2-VL / 2.5-VL: one run per image and
        per video."""
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(features)):
            yield feature, offset, feature.mm_position.length, t, h, w, t_factor

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Writes the kept tokens' positions at their placeholders (`_placed`); returns the
        embeddings without the position channels. Text positions were right from the start."""
        if self.prune_config is None:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        n = len(input_ids)
        if not multimodal_embeddings:  # decode steps, text-only prompts, chunks without media
            return [], mrope_positions, (int(mrope_positions.max()) + 1 - n if n else 0)
        with gpu_sync_allowed():
            ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
            positions = mrope_positions.clone()
            image_id, video_id = self.config.image_token_id, self.config.video_token_id
            is_media = (ids == image_id) | (ids == video_id)
            media_index = is_media.nonzero().flatten()
            media_list = media_index.tolist()
            out = []
            cursor = num_computed_tokens
            for embeddings in multimodal_embeddings:
                first = bisect.bisect_left(media_list, cursor)
                length = embeddings.shape[0]
                slots = media_index[first:first + length]  # this chunk's rows of the item, in order
                coords = decode_positions(embeddings[:, -POSITION_CHANNELS:])
                video = int(ids[slots[0]]) == video_id
                placed = self._placed(ids, positions, is_media, int(slots[0]), coords, video)
                positions[:, slots.to(positions.device)] = placed.to(positions.device)
                out.append(embeddings[:, :-POSITION_CHANNELS])
                # past the item's last placeholder (a Qwen3-VL video's frames have text between them)
                cursor = media_list[first + length - 1] + 1
            return out, positions, int(positions.max()) + 1 - n

    def _placed(self, ids: torch.Tensor, positions: torch.Tensor, is_media: torch.Tensor, start: int,
                coords: torch.Tensor, video: bool) -> torch.Tensor:
        """[3, K] positions of K rows of one item whose first row sits at placeholder `start`:
        base + coords, base following the text before the item's run (Qwen2-VL / 2.5-VL: an
        image or a video is one run; a video's temporal coordinate came scaled)."""
        run_start = start
        while run_start > 0 and bool(is_media[run_start - 1]):
            run_start -= 1
        base = int(positions[0, run_start - 1]) + 1 if run_start > 0 else 0
        return coords + base

    def _reduced_grid(self, rows: int, cols: int) -> tuple[int, int]:
        """The coarse grid a frame of rows x cols merged tokens is reduced to (grid methods, which
        only run alone or first, and renumber only alone)."""
        stage = self.prune_plan.stages[0]
        return stage.method.output_grid(stage.config.budget_for(rows * cols), (rows, cols), stage.config.options)

    # -- images and videos --------------------------------------------------------------------

    def _run_tower(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _split_streams(self, embeds: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The tower's output [T / 4, C] as (embeddings [T / 4, D], other per-token streams, each
        [T / 4, D]): none here (Qwen3-VL: its DeepStack levels)."""
        return embeds, []

    def _process_image_input(self, image_input):
        if self.prune_config is None:
            return super()._process_image_input(image_input)
        return self._process_media(image_input, "image")

    def _process_video_input(self, video_input):
        if self.prune_config is None:
            return super()._process_video_input(video_input)
        return self._process_media(video_input, "video")

    def _frame_coordinate(self, frames: torch.Tensor, media_input, item: int) -> torch.Tensor:
        """[K] temporal coordinates of kept video tokens of frames `frames` (item `item` of the
        input): Qwen2-VL / 2.5-VL scale the frame index by second_per_grid_ts * tokens_per_second,
        truncated, as vLLM's numbering of the unpruned video does (`iter_mm_grid_thw`)."""
        seconds = _optional_field(media_input, "second_per_grid_ts")
        factor = (float(seconds[item]) if seconds is not None else 1.0) * getattr(
            self.config.vision_config, "tokens_per_second", 1.0)
        if factor == 1.0:
            return frames
        return (frames.double() * factor).long()

    def _process_media(self, media_input, kind: str) -> tuple[torch.Tensor, ...]:
        """The kept tokens of each image or video of one encoder call, each [K, C + 6]: embeddings
        (and the other streams, Qwen3-VL's DeepStack levels) with the kept tokens' (t, h, w)
        coordinates in 6 position channels. Regions as on the transformers path: an image's
        frame (the call's budget policy), a video's frames ("per_frame") or the whole video
        ("per_video", `video_regions`)."""
        video = kind == "video"
        grid_thw = media_input[f"{kind}_grid_thw"]
        grids = grid_thw.tolist()
        merge = self.visual.spatial_merge_size
        if media_input["type"] == f"{kind}_embeds":
            if self.needs_tower:
                raise ValueError(f"vlm_prune: {self.prune_config.method!r} needs the vision tower; "
                                 f"precomputed {kind} embeddings cannot be scored")
            embeds, signals = media_input[f"{kind}_embeds"].type(self.visual.dtype), {}
        else:
            pixels = media_input["pixel_values_videos" if video else "pixel_values"]
            with self._capture_signals(grids) as signals:
                embeds = self._run_tower(pixels, grid_thw)
        sizes = [t * h * w // (merge * merge) for t, h, w in grids]
        embeds, streams = self._split_streams(embeds)
        per_item = {name: value.split(sizes) for name, value in signals.items()}
        streams_per_item = [stream.split(sizes) for stream in streams]
        described = []  # per stage: the items with its regions (a video's: after its video budget policy)
        for stage in self.prune_plan.stages:
            per_video = stage.config.video_policy == "per_video"
            items = []
            for i, (feats, (t, h, w)) in enumerate(zip(embeds.split(sizes), grids)):
                rows, cols = h // merge, w // merge
                if video:
                    regions, budget = video_regions(t, rows, cols, per_video, feats.device)
                else:  # the call's budget policy
                    regions, budget = [Region.span(f * rows * cols, (f + 1) * rows * cols, (rows, cols), feats.device)
                                       for f in range(t)], None
                items.append(ImageTokens(feats, regions,
                                         {name: v[i].to(feats.device) for name, v in per_item.items()},
                                         streams=[stream[i] for stream in streams_per_item], budget=budget,
                                         video=video))
            described.append(items)
        reduced = reduce_in_stages(self.prune_plan.stages, described)
        # each stream reduced: [sum K_i, D] in item order, back to per item
        reduced_streams = [stream.split(reduced.counts) for stream in reduced.streams]
        out = []
        for i, (slots_kept, feats, (t, h, w)) in enumerate(zip(reduced.kept, reduced.features, grids)):
            rows, cols = h // merge, w // merge
            if self.prune_plan.positions == "renumber":  # numbered as an item of the coarse grid
                rows, cols = self._reduced_grid(rows, cols)
                slots = torch.arange(t * rows * cols)
            else:
                slots = slots_kept.nonzero().flatten().cpu()
            frames = slots // (rows * cols)
            if video:
                frames = self._frame_coordinate(frames, media_input, i)
            coords = torch.stack([frames, (slots % (rows * cols)) // cols, slots % cols], dim=1)
            out.append(torch.cat([feats, *(stream[i] for stream in reduced_streams),
                                  encode_positions(coords, feats.dtype).to(feats.device)], dim=1))
        return tuple(out)

    # -- the [CLS]-free score (patches/qwen2_vl.py, on vLLM's tower modules) -------------------

    @contextlib.contextmanager
    def _capture_signals(self, grids: list[list[int]]):
        """Yields a dict filled, once the tower ran, with per merged token of all images (raster
        order): "cls_attention" [T / 4] float32 (attention received in the last block) and, for
        methods that need them, "keys" [T / 4, Dh] (that block's keys, before the rotary, heads
        averaged). Captured where the block rotates q and k (one call, [2, T, heads, Dh], q
        first): this rank's heads in both families and any tensor-parallel size; the head
        averages are all-reduced over the group."""
        result: dict[str, torch.Tensor] = {}
        if not self.needs_tower:
            yield result
            return
        attn = self.visual.blocks[-1].attn
        seen: dict[str, Any] = {}

        def keep_inputs(module, args, kwargs):
            seen["cu_seqlens"] = kwargs.get("cu_seqlens")

        def keep_rotary(module, args, output):
            seen["qk"], seen["qk_rotated"] = args[0], output

        handles = [attn.register_forward_pre_hook(keep_inputs, with_kwargs=True),
                   attn.apply_rotary_emb.register_forward_hook(keep_rotary)]
        try:
            yield result
        finally:
            for handle in handles:
                handle.remove()
        if "qk" not in seen:
            raise RuntimeError("vlm_prune: the last vision block's rotary embedding was not seen running "
                               "(a compiled vision encoder, compile_mm_encoder, hides it)")
        heads, head_dim = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
        total_heads = heads * attn.tp_size
        all_reduce = tensor_model_parallel_all_reduce if attn.tp_size > 1 else None
        total = seen["qk"].shape[-3]
        unit = self.visual.spatial_merge_size ** 2
        window_index = self._window_index(grids).to(seen["qk"].device) if self.windowed else None

        def per_merged_token(values: torch.Tensor) -> torch.Tensor:
            return merge_unit_mean(values, unit, window_index)

        if "keys" in self.prune_plan.needs:  # heads averaged, as on transformers
            k = seen["qk"].reshape(2, total, heads, head_dim)[1]
            result["keys"] = per_merged_token(keys_over_heads(k, total_heads, all_reduce))
        if "cls_attention" in self.prune_plan.needs:
            q_rot, k_rot = seen["qk_rotated"].reshape(2, total, heads, head_dim).unbind(0)
            segments = self._score_segments(grids, seen["cu_seqlens"])
            received = received_attention(q_rot, k_rot, head_dim ** -0.5, segments, total_heads, all_reduce)
            result["cls_attention"] = per_merged_token(received)

    def _score_segments(self, grids, captured: torch.Tensor) -> torch.Tensor:
        """Attention segments of the last block: one per frame (full attention)."""
        bounds = [0]
        for t, h, w in grids:
            bounds += [bounds[-1] + h * w * (f + 1) for f in range(t)]
        return torch.tensor(bounds, dtype=torch.int64)

    def _window_index(self, grids) -> torch.Tensor:
        raise NotImplementedError


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2VLMultiModalProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class PrunedQwen2VLForConditionalGeneration(_PrunedQwenMixin, Qwen2VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning(vllm_config)

    def _run_tower(self, pixel_values, grid_thw):
        return self.visual(pixel_values, grid_thw=grid_thw)


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class PrunedQwen2_5_VLForConditionalGeneration(_PrunedQwenMixin, Qwen2_5_VLForConditionalGeneration):
    windowed = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning(vllm_config)

    def _run_tower(self, pixel_values, grid_thw):
        return self.visual(pixel_values, grid_thw=grid_thw.tolist())

    def _window_index(self, grids) -> torch.Tensor:
        """permuted[j] = raster[index[j]] over the merge units of all images."""
        parts, offset = [], 0
        for t, h, w in grids:
            index, _ = self.visual.get_window_index_thw(t, h, w)
            parts.append(index + offset)
            offset += t * (h // self.visual.spatial_merge_size) * (w // self.visual.spatial_merge_size)
        return torch.cat(parts)

    def _score_segments(self, grids, captured):
        if len(self.visual.blocks) - 1 in self.visual.fullatt_block_indexes:
            return super()._score_segments(grids, captured)
        return captured.cpu()  # a windowed last block: its own window segments
