"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, model_type "llava_next"): anyres images.

Each image is a base view plus a grid of crops; transformers' `pack_image_features` puts the base
image's tokens first, then the crops merged into one grid, unpadded to the image's aspect ratio,
with an `image_newline` token closing every row. The scores and the crop layout go through that
same function (packed as extra channels), so they line up with the features whatever the
unpadding removed. `image_newline` tokens are always kept.

Regions a method reduces: the base image (side x side) and either the whole unpadded crop grid
(budget="per_image", the default: `keep` counts the image's tokens, split between base and grid
in proportion to their size) or each crop's share of it (budget="per_crop": `keep` applies to
the base image and to each crop, as FasterVLM does).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ImageTokens, Region
from .llava import LlavaPatch

_CROP, _ROW, _COL = range(3)  # packed channels, then the signals


class LlavaNextPatch(LlavaPatch):
    def check_model(self) -> None:
        super().check_model()
        strategy = self.model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"LLaVA-NeXT with vision_feature_select_strategy={strategy!r} is not supported; "
                "vlm_prune supports 'default' (the [CLS] token dropped), as all LLaVA-NeXT checkpoints use"
            )

    def encode(self, kw: dict[str, Any]) -> Any:
        return self.model.model.get_image_features(
            kw["pixel_values"],
            kw.get("image_sizes"),
            vision_feature_layer=kw.get("vision_feature_layer"),
            vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
            return_dict=True,
        )

    def _crops_per_image(self, image_sizes) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        return [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in image_sizes
        ]

    def describe_images(self, output, call, signals) -> list[ImageTokens]:
        image_sizes = call.get("image_sizes")
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT image features came without image_sizes; pass pixel_values and image_sizes")
        features = list(output.pooler_output)
        crops = self._crops_per_image(image_sizes)
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        # Per-crop signals, [CLS] dropped ("default" strategy), become extra packed channels.
        extra = {}
        if "cls_attention" in signals:
            extra["cls_attention"] = signals["cls_attention"][:, 1:, None]
        if "keys" in signals:
            extra["keys"] = signals["keys"][:, 1:]
        if "pre_projection" in signals:
            extra["pre_projection"] = signals["pre_projection"]
        widths = {name: value.shape[-1] for name, value in extra.items()}
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        layout = []
        starts = [0]
        for n_crops in crops:
            starts.append(starts[-1] + n_crops)
        for i, n_crops in enumerate(crops):
            ch = [torch.arange(n_crops, dtype=torch.float32)[:, None, None].expand(-1, side * side, 1),
                  rows.flatten().float()[None, :, None].expand(n_crops, -1, 1),
                  cols.flatten().float()[None, :, None].expand(n_crops, -1, 1)]
            ch += [value[starts[i]:starts[i + 1]].float().cpu() for value in extra.values()]
            layout.append(torch.cat(ch, dim=-1))
        newline = torch.zeros(layout[0].shape[-1])
        newline[[_CROP, _ROW, _COL]] = -1.0
        packed, _ = self.model.model.pack_image_features(
            layout, image_sizes, vision_feature_select_strategy="default", image_newline=newline
        )
        images = []
        for i, (feats, channels) in enumerate(zip(features, packed)):
            if channels.shape[0] != feats.shape[0]:
                raise ValueError(f"image {i}: {feats.shape[0]} features but the packed layout has {channels.shape[0]} tokens")
            channels = channels.to(feats.device)
            image_signals, offset = {}, 3
            for name, width in widths.items():
                value = channels[:, offset:offset + width]
                image_signals[name] = value[:, 0] if name == "cls_attention" else value.to(feats.dtype)
                offset += width
            images.append(ImageTokens(feats, self._regions(channels, side), image_signals))
        return images

    def _regions(self, channels: torch.Tensor, side: int) -> list[Region]:
        """The base image, then the crop grid (per_image) or each crop's part of it (per_crop)."""
        crop = channels[:, _CROP].round().long()
        regions = [Region((crop == 0).nonzero().flatten(), (side, side))]
        grid_slots = (crop >= 1).nonzero().flatten()
        if len(grid_slots) == 0:
            return regions
        if self.budget == "per_image":
            newline_slots = (crop < 0).nonzero().flatten()
            width = int(newline_slots[newline_slots > grid_slots[0]][0] - grid_slots[0])
            regions.append(Region(grid_slots, (len(grid_slots) // width, width)))
            return regions
        for c in crop[grid_slots].unique().tolist():
            slots = (crop == c).nonzero().flatten()
            height = len(channels[slots, _ROW].unique())
            width = len(channels[slots, _COL].unique())
            regions.append(Region(slots, (height, width)))
        return regions
