"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, model_type "llava_next"): the family adapter, anyres images.

Each image is a base view plus a grid of crops; transformers' `pack_image_features` puts the base
image's tokens first, then the crops merged into one grid, unpadded to the image's aspect ratio,
with an `image_newline` token closing every row. Each crop token's number goes through that same
function (before the tower, on the host: `PackedLayout`), so the per-crop scores line up with
the features whatever the unpadding removed, and nothing after the tower reads the device.
`image_newline` tokens are always kept.

Regions a method reduces: the base image (side x side) and either the whole unpadded crop grid
(budget="per_image": `keep` counts the image's tokens, split between base and grid in proportion
to their size) or each crop's share of it (budget="per_crop": `keep` applies to the base image
and to each crop, as FasterVLM's and VisionZip's releases do); or budget="pooled": all the
image's tokens, newlines included, as one pool with no grid (DivPrune's and TransPrune's
releases). Each method's default is its release's (`VisionMethod.default_budget`).

A whole-image method (one with `reduce_image`, GlobalCom²) gets the per-crop regions and sets
every region's budget itself; each image then also says where its crops lie (`ImageTokens.tiles`:
the crop grid's rows x cols). Methods that need "cls_logits" get the [CLS] query's pre-softmax
attention logits (q_cls . k * scale, heads averaged, summed over the score layers) per token,
from the same q/k projections as "cls_attention".
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any

import numpy as np
import torch

from ..image_tokens import ImageTokens, Region
from .base import this_thread_only
from .llava import LlavaAdapter, _store


class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)

    def check(self) -> None:
        super().check()
        strategy = self.model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"LLaVA-NeXT with vision_feature_select_strategy={strategy!r} is not supported; "
                "vlm_prune supports 'default' (the [CLS] token dropped), as all LLaVA-NeXT checkpoints use"
            )
        config = self.plan.config
        if getattr(self.plan.method, "reduce_image", None) is not None and config.budget not in (None, "per_crop"):
            raise ValueError(
                f"method {config.method!r} sets the budget of the base image and of each crop itself; "
                f"budget={config.budget!r} does not apply to it (leave budget unset)"
            )

    @contextlib.contextmanager
    def capture_signals(self, scratch):
        """The family's tower signals, plus "cls_logits" [crops, T] for methods that need it."""
        if "cls_logits" not in self.plan.method.needs or not self.score_layers:
            with self._capture_tower_signals(scratch) as result:
                yield result
            return
        captured: dict[int, dict[str, torch.Tensor]] = {}
        handles = []
        for layer_idx, attn in zip(self.score_layers, self._score_attention):
            slot = captured.setdefault(layer_idx, {})
            handles.append(attn.q_proj.register_forward_hook(this_thread_only(_store(slot, "q", first_row=True))))
            handles.append(attn.k_proj.register_forward_hook(this_thread_only(_store(slot, "k"))))
        try:
            with self._capture_tower_signals(scratch) as result:
                yield result
        finally:
            for handle in handles:
                handle.remove()
        total = None
        for layer_idx, attn in zip(self.score_layers, self._score_attention):
            q, k = captured[layer_idx]["q"].float(), captured[layer_idx]["k"].float()
            heads, head_dim = attn.num_heads, attn.head_dim
            query = q.view(q.shape[0], heads, 1, head_dim)
            keys = k.view(k.shape[0], k.shape[1], heads, head_dim).transpose(1, 2)
            logits = (query @ keys.transpose(-1, -2)).squeeze(-2).mul(attn.scale).mean(1)  # [crops, T]
            total = logits if total is None else total + logits
        result["cls_logits"] = total

    def encode(self, kw: dict[str, Any]) -> Any:
        return self.model.model.get_image_features(
            kw["pixel_values"],
            kw.get("image_sizes"),
            vision_feature_layer=kw.get("vision_feature_layer"),
            vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
            return_dict=True,
        )

    def before_tower(self, call: dict[str, Any], scratch: dict[str, Any]) -> None:
        if call.get("image_sizes") is not None:
            self._layout(call["image_sizes"], call["pixel_values"].device, scratch)

    def _layout(self, image_sizes, device, scratch: dict[str, Any]) -> "PackedLayout":
        """The packing of the images of `image_sizes`, made once per call (before the tower, from
        the encoder wrapper) -- from the sizes alone, on the host, so nothing after the tower
        reads the device."""
        made = scratch.get("layout")
        if made is None or made[0] is not image_sizes:
            # made as normal tensors even under inference_mode, which a later call with autograd
            # on could not use
            with torch.inference_mode(False):
                layout = PackedLayout.of(self.model.config, image_sizes, self.plan.budget, device,
                                         pack=self.model.model.pack_image_features)
            made = scratch["layout"] = (image_sizes, layout)
        return made[1]

    def describe_images(self, output, call, signals, scratch) -> list[ImageTokens]:
        image_sizes = call.get("image_sizes")
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT image features came without image_sizes; pass pixel_values and image_sizes")
        features = list(output.pooler_output)
        layout = self._layout(image_sizes, features[0].device, scratch)
        return layout.images(features, signals)


class PackedLayout:
    """Where each of an image's packed tokens comes from, and the regions a method reduces.

    Built by sending each crop's token numbers (crop * side^2 + token) through transformers'
    `pack_image_features` on the host, with -1 as the image_newline; so it lines up with the
    features whatever the unpadding removed. Shared with the vLLM plugin, whose model packs its
    features with vLLM's port of the same function.
    rows:    {after_cls: [sum N_i] int64 on the device}: per packed token of all images, its row
             in the images' per-crop tokens flattened (after each crop's [CLS] token, or without
             one); 0 for an image_newline (no region reads it).
    lengths: packed tokens per image; regions: per image, the base image, then the crop grid
             (budget "per_image") or each crop's part of it ("per_crop"); or one region of all
             the image's tokens ("pooled"). crops: per image, its tower inputs (base + crops).
    tiles:   per image, its crop grid (rows, cols): crop c >= 1 is tile divmod(c - 1, cols), in
             raster order over the padded grid.
    """

    def __init__(self, rows: dict[bool, torch.Tensor], lengths: list[int], regions: list[list[Region]],
                 crops: list[int], tiles: list[tuple[int, int]] | None = None):
        self.rows, self.lengths, self.regions, self.crops = rows, lengths, regions, crops
        self.tiles = tiles if tiles is not None else [None] * len(crops)

    @classmethod
    def of(cls, config, image_sizes, budget: str, device, pack=None) -> "PackedLayout":
        """config: a LlavaNextConfig; image_sizes: [I, 2] (height, width) as a tensor or lists;
        pack: the model's `pack_image_features` (default: transformers', which reads only the
        config)."""
        from transformers.models.llava_next.modeling_llava_next import (LlavaNextModel, get_anyres_image_grid_shape,
                                                                         image_size_to_num_patches)

        if pack is None:
            pack = functools.partial(LlavaNextModel.pack_image_features, types.SimpleNamespace(config=config))
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
        side = config.vision_config.image_size // config.vision_config.patch_size
        per_crop = side * side
        crops = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                 for size in sizes]
        tiles = [tuple(int(t) for t in get_anyres_image_grid_shape(size, config.image_grid_pinpoints,
                                                                   config.vision_config.image_size))
                 for size in sizes]
        numbers = [torch.arange(n * per_crop, dtype=torch.float64).view(n, per_crop, 1) for n in crops]
        # host lists as sizes: the function reads them without a tensor conversion
        packed, _ = pack(numbers, sizes, vision_feature_select_strategy="default",
                         image_newline=torch.full((1,), -1.0, dtype=torch.float64))
        tokens, regions, first_crop = [], [], 0
        for n_crops, numbers_i in zip(crops, packed):
            token = numbers_i[:, 0].numpy().round().astype(np.int64)  # -1: image_newline
            regions.append([_region(slots, grid, device, crop) for slots, grid, crop in _regions(token, side, budget)])
            tokens.append(np.where(token >= 0, token + first_crop * per_crop, -1))
            first_crop += n_crops
        token = np.concatenate(tokens)
        newline = token < 0
        rows = {False: np.where(newline, 0, token),
                True: np.where(newline, 0, token + token // per_crop + 1)}  # each crop's [CLS] first
        return cls({key: torch.from_numpy(value).to(device) for key, value in rows.items()},
                   [len(t) for t in tokens], regions, crops, tiles)

    def pack(self, per_crop: torch.Tensor, after_cls: bool) -> list[torch.Tensor]:
        """[crops, T, ...] a signal per crop token ([CLS] first when `after_cls`) -> per image
        [N_i, ...] in packed order: one op for the whole batch."""
        flat = per_crop.reshape(-1, *per_crop.shape[2:])
        return list(flat.index_select(0, self.rows[after_cls]).split(self.lengths))

    def images(self, features: list[torch.Tensor], signals: dict[str, torch.Tensor]) -> list[ImageTokens]:
        """features: per image [N_i, D], packed (the model's own packing); signals: per crop,
        "cls_attention" / "cls_logits" [crops, T], "keys" [crops, T, Dv] (the tower's, [CLS] first,
        which the "default" strategy drops), "pre_projection" [crops, T - 1, Dv] and "cls_feature"
        [crops, Dv] -> the images, with their signals in packed order ("cls_feature": per
        image [its crops, Dv], the base image first)."""
        packed = {name: self.pack(value, after_cls=name != "pre_projection") for name, value in signals.items()
                  if name in ("cls_attention", "cls_logits", "keys", "pre_projection")}
        cls_features = signals["cls_feature"].split(self.crops) if "cls_feature" in signals else None
        images = []
        for i, (feats, regions) in enumerate(zip(features, self.regions)):
            if self.lengths[i] != feats.shape[0]:
                raise ValueError(f"image {i}: {feats.shape[0]} features but the packed layout has {self.lengths[i]} tokens")
            image_signals = {name: value[i] if name in ("cls_attention", "cls_logits") else value[i].to(feats.dtype)
                             for name, value in packed.items()}
            context = {"cls_feature": cls_features[i]} if cls_features is not None else {}
            tiles = self.tiles[i] if self.crops[i] > 1 else None
            images.append(ImageTokens(feats, regions, image_signals, context, tiles=tiles))
        return images


def _region(slots: np.ndarray, grid: tuple[int, int], device, crop: int | None) -> Region:
    """A region on `device`; a span (read as a slice, no index tensor) when its slots are consecutive."""
    if len(slots) and slots[-1] - slots[0] == len(slots) - 1:
        return Region.span(int(slots[0]), int(slots[-1]) + 1, grid, device, crop)
    return Region(torch.from_numpy(slots).to(device), grid, crop=crop)


def _regions(token: np.ndarray, side: int, budget: str) -> list[tuple[np.ndarray, tuple[int, int], int | None]]:
    """(slots, grid, crop) of one image's regions from its packed token numbers (-1:
    image_newline); crop: the image's crop the region is (0: the base image), None for the
    grid of several crops."""
    if budget == "pooled":  # every token, newlines included, in one pool without a grid
        return [(np.arange(len(token)), (1, len(token)), None)]
    per_crop = side * side
    crop = np.where(token >= 0, token // per_crop, -1)
    regions = [(np.flatnonzero(crop == 0), (side, side), 0)]
    grid_slots = np.flatnonzero(crop >= 1)
    if len(grid_slots) == 0:
        return regions
    if budget == "per_image":
        newline_slots = np.flatnonzero(crop < 0)
        width = int(newline_slots[newline_slots > grid_slots[0]][0] - grid_slots[0])
        regions.append((grid_slots, (len(grid_slots) // width, width), None))
        return regions
    for c in np.unique(crop[grid_slots]):
        slots = np.flatnonzero(crop == c)
        within = token[slots] % per_crop
        regions.append((slots, (len(np.unique(within // side)), len(np.unique(within % side))), int(c)))
    return regions
