"""Qwen2-VL and Qwen2.5-VL (model_type "qwen2_vl", "qwen2_5_vl"): the family adapter.

Seam: the vision-stage engine hooks the inner `Qwen2VLModel` / `Qwen2_5_VLModel`, as for LLaVA. Each
image is a (t, h, w) patch grid; the merger turns every 2x2 unit into one LLM token, so an image
is t frames of (h/2) x (w/2) tokens, one region per frame.

Positions: M-RoPE gives each visual token (t, h, w) positions and text after an image continues
from max(h, w) of the image. Kept tokens keep their 3D positions and text keeps its positions
too, exactly as in the unpruned model (positions="original", the only policy here: a grid
coordinate has nothing to renumber); decode steps continue from the unpruned model's numbering
(its rope_deltas), so the pruned cache lines up. The positions of image prompts come from
`mrope.image_rope_index` (vectorised, no device read; checked against the model's own
`get_rope_index` on the first prompt), those of prompts with videos from the model's.

[CLS]-free score for `cls_attention` (Qwen has no [CLS] token): the attention each patch
receives in the last vision block, averaged over heads and query rows of its image (VisPruner's
fallback), then averaged over each 2x2 merge unit. q/k come from that block's own qkv projection
(a forward hook) with its rotary embedding applied, and only the column means are computed in
chunks, so the tower keeps SDPA. Qwen2.5-VL runs blocks on window-permuted merge units; the
permutation is undone before the scores reach the method.

Videos are pruned as images are, in the same prefill (their tokens join the images' in
placeholder order): a video is t temporal patches ("frames") of (h/2) x (w/2) merged tokens.
`video_budget="per_frame"` makes each frame a region with its own budget (`keep` per frame);
"per_video" makes the whole video one region of grid (t, h/2, w/2), its tokens one pool
(`keep` per video). Kept video tokens keep their M-RoPE positions, as image tokens do.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from typing import Any

import torch

from vlm_prune.compat import cache_length, get_cache, vision_window_index
from vlm_prune.kernels.attention_received import attention_received_rotary
from vlm_prune.timing import clock
from vlm_prune.vision_layers import refuse_layers

from ..image_tokens import ImageTokens, Region, region_budgets, video_regions
from ..model_hooks import kw_batch, kw_device
from ..mrope import image_rope_index
from .base import FamilyAdapter, this_thread_only


QWEN_SCORED_BY = "the attention each token receives in the last vision block"


def merge_unit_mean(values: torch.Tensor, unit: int, window_index: torch.Tensor | None = None) -> torch.Tensor:
    """[T, ...] per patch -> [T / unit, ...] per merged token (the merger's 2x2 units averaged),
    in raster order. window_index: Qwen2.5-VL's block order, permuted[j] = raster[index[j]]."""
    return to_raster(values.reshape(-1, unit, *values.shape[1:]).mean(1), window_index)


def to_raster(units: torch.Tensor, window_index: torch.Tensor | None) -> torch.Tensor:
    """[M, ...] per merged token in the blocks' order -> raster order (see merge_unit_mean)."""
    if window_index is None:
        return units
    raster = torch.empty_like(units)
    raster[window_index] = units
    return raster


class QwenVLAdapter(FamilyAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    default_positions = "original"  # M-RoPE: kept tokens keep their 3D positions
    sequential_positions = False  # M-RoPE positions come from get_rope_index
    # An M-RoPE position is a grid coordinate, not a count: there is nothing to renumber, and
    # text after an image already continues from the image's extent, not its token count.
    position_policies = ("original",)
    sequence_kwargs = ("mm_token_type_ids",)
    continues_with_images = False
    continuation_refusal = " (the M-RoPE positions of a new image after cached tokens)"

    @classmethod
    def allowed_positions(cls, method) -> tuple[str, ...]:
        # a method whose output is a coarser grid can be numbered as an image of that grid
        return ("original", "renumber") if method.output_is_grid else ("original",)

    def check(self) -> None:
        refuse_layers(self.plan.config.options.get("layers"), "Qwen-VL", QWEN_SCORED_BY)
        self._fast_rope: bool | None = None  # image_rope_index checked against the model's (None: not yet)
        self.visual = self.model.model.visual
        self.merge_unit = self.visual.spatial_merge_size**2
        self.windowed = hasattr(self.visual, "fullatt_block_indexes")  # Qwen2.5-VL

    def encode(self, kw: dict[str, Any]) -> Any:
        return self.model.model.get_image_features(kw["pixel_values"], kw.get("image_grid_thw"), return_dict=True)

    def prepare(self, kw: dict[str, Any], scratch: dict[str, Any]) -> None:
        """Reads image_grid_thw (and Qwen2.5's window permutation of it) into the call's scratch."""
        if self.plan.positions == "renumber" and kw.get("video_grid_thw") is not None:
            raise NotImplementedError(
                "vlm_prune: positions='renumber' (images numbered as their coarse grid) with a video in the "
                "prompt is not supported on Qwen-VL; use positions='original'")
        grid_thw = kw.get("image_grid_thw")
        if grid_thw is not None:
            scratch["grids"] = (grid_thw, grid_thw.tolist())
            if self.windowed and self.plan.method.needs & {"cls_attention", "keys"}:
                scratch["window_index"] = (grid_thw, vision_window_index(self.visual, grid_thw).to(grid_thw.device))

    def expected_visual_tokens(self, kw: dict[str, Any], scratch: dict[str, Any]) -> int | None:
        grid_thw, video_thw = kw.get("image_grid_thw"), kw.get("video_grid_thw")
        images = kw.get("pixel_values") is not None
        videos = kw.get("pixel_values_videos") is not None
        if (images and grid_thw is None) or (videos and video_thw is None) or not (images or videos):
            return None
        count = sum(t * h * w for t, h, w in self._grid_list(grid_thw, scratch)) if images else 0
        if videos:  # a device read, in prompts with videos only
            count += sum(t * h * w for t, h, w in video_thw.tolist())
        return count // self.merge_unit

    @staticmethod
    def _grid_list(grid_thw: torch.Tensor, scratch: dict[str, Any]) -> list[list[int]]:
        """image_grid_thw on the host: as prepare() read it before the tower, else read now."""
        read = scratch.get("grids")
        return read[1] if read is not None and read[0] is grid_thw else grid_thw.tolist()

    # -- positions ----------------------------------------------------------------------------

    def base_positions(self, kw: dict[str, Any], length: int, scratch: dict[str, Any]) -> torch.Tensor:
        if kw.get("position_ids") is not None:  # generate(): [4, B, L] (text + 3D)
            return kw["position_ids"]
        if kw.get("input_ids") is None or kw.get("mm_token_type_ids") is None:
            return self._models_fallback_positions(kw, length)
        inner = self.model.model
        accepted = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")
        extra = {k: kw[k] for k in accepted if kw.get(k) is not None}

        def models_own():
            return inner.get_rope_index(kw["input_ids"], mm_token_type_ids=kw["mm_token_type_ids"], **extra)

        grid_thw = kw.get("image_grid_thw")
        if self._fast_rope is not False and kw.get("video_grid_thw") is None and grid_thw is not None:
            mask = kw.get("attention_mask")
            positions, deltas = image_rope_index(kw["mm_token_type_ids"], mask, self._grid_list(grid_thw, scratch),
                                                 self.visual.spatial_merge_size)
            if self._fast_rope is None:  # first prompt: the same numbering as this transformers release?
                expected, expected_deltas = models_own()
                valid = mask.bool() if mask is not None else slice(None)
                self._fast_rope = bool(torch.equal(positions[:, valid], expected[:, valid])
                                       and torch.equal(deltas, expected_deltas.to(deltas)))
                if not self._fast_rope:
                    warnings.warn("vlm_prune: this transformers release numbers Qwen's M-RoPE positions differently "
                                  "from vlm_prune's vectorised index; using the model's get_rope_index",
                                  RuntimeWarning, stacklevel=2)
                    positions, deltas = expected, expected_deltas
        else:
            positions, deltas = models_own()
        inner.rope_deltas = deltas  # what the unpruned forward would have stored
        return positions

    def reduced_positions(self, positions, comp, is_image, mask, images, scratch):
        """positions="renumber" (methods whose output is a coarser grid, Fourier-VLM's release):
        each reduced image is numbered as an image of its coarse grid (t, r, c) -- grid_thw
        shrinks -- and the text after it continues from that smaller extent; decode steps
        continue the same numbering."""
        if self.plan.positions != "renumber":
            return positions, None
        merge = self.visual.spatial_merge_size
        if images is not None:  # a prefill; its replays (generate(use_cache=False)) reuse them
            scratch["reduced_grids"] = [self._reduced_grid(img, merge) for img in images]
        valid = torch.ones_like(is_image, dtype=torch.long) if mask is None else mask
        types, valid = comp.gather(is_image.long(), 0), comp.gather(valid, 0)
        grid, deltas = image_rope_index(types, valid, scratch["reduced_grids"], merge)
        if positions.dim() == 3 and positions.shape[0] > 3:  # generate()'s text plane first: compacted index
            grid = torch.cat([positions[:-3], grid])
        # Decode steps get the unpruned numbering (generate() continues its own prompt positions;
        # rope_deltas stays the unpruned model's for them): the engine takes off the dropped
        # tokens, and this the difference of the deltas.
        unpruned = self.model.model.rope_deltas
        return grid, None if unpruned is None else (unpruned.to(deltas.device) - deltas)

    def _reduced_grid(self, image: ImageTokens, merge: int) -> list[int]:
        """(t, h, w) in patches of an image whose frames were each reduced to the coarse grid."""
        plan = self.plan
        k = region_budgets(plan.run_config, image.regions, plan.budget)[0]
        rows, cols = plan.method.output_grid(k, image.regions[0].grid, plan.run_config.options)
        return [len(image.regions), rows * merge, cols * merge]

    def _models_fallback_positions(self, kw: dict[str, Any], length: int) -> torch.Tensor:
        """Without input_ids or mm_token_type_ids the model cannot place the images: its own
        `compute_3d_position_ids` then numbers the tokens as text (plus the rope_deltas of an
        earlier prompt when only inputs_embeds are given), or raises its own error (Qwen2-VL
        given input_ids with images but no token types); where it gives none, the language
        model numbers them 0..L-1 on every axis."""
        compute = getattr(self.model.model, "compute_3d_position_ids", None)
        positions = None
        if compute is not None:
            names = inspect.signature(compute).parameters
            positions = compute(**{name: get_cache(kw) if name == "cache" else kw.get(name) for name in names})
        if positions is None:
            positions = torch.arange(length, device=kw_device(kw)).view(1, 1, -1).expand(3, kw_batch(kw), -1)
        return positions

    def generate_kwargs(self, kwargs, state_of):
        cache = get_cache(kwargs)
        if kwargs.get("mm_token_type_ids") is None or not cache_length(cache) or state_of(cache) is None:
            return kwargs
        # A new turn on a pruned cache: generate() looks for new images after the cache's length,
        # the pruned one, so it would take the first turn's image for a new one and number the new
        # tokens from scratch. A prompt that continues a cache brings no new image (refused), so
        # without the types generate() numbers the new tokens as the unpruned model's would be.
        return {k: v for k, v in kwargs.items() if k != "mm_token_type_ids"}

    def decode_positions(self, kw: dict[str, Any], start: int, full_mask: torch.Tensor | None) -> torch.Tensor:
        """As Qwen's forward numbers new tokens: text position (from the unpruned mask when
        given, else the unpruned sequence index) plus rope_deltas, on all three axes."""
        text = super().decode_positions(kw, start, full_mask)
        if full_mask is not None:
            text = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -text.shape[1]:]
        deltas = self.model.model.rope_deltas
        if deltas is None:  # a prefill from inputs_embeds: the model numbers on as text
            deltas = torch.zeros(1, 1, dtype=torch.long)
        return text.unsqueeze(0).expand(3, -1, -1) + deltas.to(text.device)

    # -- images -------------------------------------------------------------------------------

    def describe_images(self, output, call, signals, scratch) -> list[ImageTokens]:
        grid_thw = call.get("image_grid_thw")
        if grid_thw is None:
            raise ValueError("Qwen-VL image features came without image_grid_thw; pass pixel_values and image_grid_thw")
        return self._describe(list(output.pooler_output), self._grid_list(grid_thw, scratch), signals, "image")

    # -- videos -----------------------------------------------------------------------------

    def video_token_id(self) -> int | None:
        return self.model.config.video_token_id

    def encode_videos(self, kw: dict[str, Any]) -> Any:
        return self.model.model.get_video_features(kw["pixel_values_videos"], kw.get("video_grid_thw"),
                                                   return_dict=True)

    def describe_videos(self, output, call, signals, scratch) -> list[ImageTokens]:
        grid_thw = call.get("video_grid_thw")
        if grid_thw is None:
            raise ValueError("Qwen-VL video features came without video_grid_thw; pass pixel_values_videos and "
                             "video_grid_thw")
        return self._describe(list(output.pooler_output), grid_thw.tolist(), signals, "video")

    def _describe(self, features: list[torch.Tensor], grids: list[list[int]], signals: dict[str, torch.Tensor],
                  kind: str) -> list[ImageTokens]:
        """Per image or video of the tower's call: its tokens, one region per frame (a video under
        video_budget="per_video": one region over all frames), its share of the call's signals."""
        merge = self.visual.spatial_merge_size
        sizes = [int(t * h * w) // self.merge_unit for t, h, w in grids]
        per_item = {name: signals[name].split(sizes) for name in ("cls_attention", "keys") if name in signals}
        video = kind == "video"
        whole_video = video and self.plan.config.video_policy == "per_video"
        items = []
        for i, (feats, (t, h, w)) in enumerate(zip(features, grids)):
            rows, cols = h // merge, w // merge
            per_frame = rows * cols
            if feats.shape[0] != t * per_frame:
                raise ValueError(f"{kind} {i}: {feats.shape[0]} features for a {t}x{rows}x{cols} token grid")
            item_signals = {name: values[i].to(feats.device) for name, values in per_item.items()}
            if video:  # per frame (each keeps `keep`) or one pool (see image_tokens.video_regions)
                regions, budget = video_regions(t, rows, cols, whole_video, feats.device)
            else:  # an image's frames share its budget
                regions, budget = [Region.span(f * per_frame, (f + 1) * per_frame, (rows, cols), feats.device)
                                   for f in range(t)], None
            items.append(ImageTokens(feats, regions, item_signals, budget=budget, video=video))
        return items

    def capture_signals(self, scratch):
        if self.plan.method.needs & {"cls_attention", "keys"}:
            return self._capture_attention_received(scratch)
        return contextlib.nullcontext({})

    @contextlib.contextmanager
    def _capture_attention_received(self, scratch: dict[str, Any]):
        """Yields a dict that holds, once the tower ran, per merged token of all images of the
        call (raster order): "cls_attention" [T / 4] float32, the attention received in the last
        block; "keys" [T / 4, Dh], that block's keys averaged over heads (methods that need them)."""
        result: dict[str, torch.Tensor] = {}
        attn = self.visual.blocks[-1].attn
        seen: dict[str, Any] = {}

        def keep_inputs(module, args, kwargs):
            seen["cu_seqlens"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            seen["position_embeddings"] = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)

        def keep_qkv(module, args, output):
            seen["qkv"] = output

        grid_seen: dict[str, torch.Tensor] = {}

        def keep_grid(module, args, kwargs):
            grid_seen["grid_thw"] = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

        handles = [
            attn.register_forward_pre_hook(this_thread_only(keep_inputs), with_kwargs=True),
            attn.qkv.register_forward_hook(this_thread_only(keep_qkv)),
            self.visual.register_forward_pre_hook(this_thread_only(keep_grid), with_kwargs=True),
        ]
        try:
            yield result
        finally:
            for h in handles:
                h.remove()
        start = clock(self.model)
        qkv = seen["qkv"]
        total = qkv.shape[0]
        q, k, _ = qkv.reshape(total, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        window_index = None
        if self.windowed:  # blocks ran on window-permuted units
            grid_thw = grid_seen["grid_thw"]
            read = scratch.get("window_index")
            window_index = (read[1] if read is not None and read[0] is grid_thw
                            else vision_window_index(self.visual, grid_thw)).to(qkv.device)
        method = self.plan.method
        if "keys" in method.needs:  # VisionZip's key similarity: the block's keys, pre-rotary, heads averaged
            result["keys"] = merge_unit_mean(k.mean(1), self.merge_unit, window_index)
        if "cls_attention" in method.needs:
            cos, sin = seen["position_embeddings"]
            # fused (rotary, scores, unit means) on the Triton backend; the reference uses the
            # model's own rotary
            received = attention_received_rotary(q, k, cos, sin, attn.scaling, seen["cu_seqlens"], self.merge_unit,
                                                 rotary=rotary, backend=self.plan.config.backend)
            result["cls_attention"] = to_raster(received, window_index)
        scratch["signal_s"] = scratch.get("signal_s", 0.0) + clock(self.model) - start
