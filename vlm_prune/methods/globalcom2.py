"""`globalcom2`: GlobalCom² -- LLaVA-NeXT's thumbnail commands the compression of its crops.

Release: github xuyang-liu16/GlobalCom2 @ 96b2d00, `llava/model/llava_arch.py`
(`compress_thumbnail`, `generate_scale_for_crop_features`, `compress_crops`,
`interpolate_and_split_cls_attn_scores`, `select_topk_crop_features`; retention_ratio = 0.25 at
line 101, its README's default) with the score of `llava/model/multimodal_encoder/
apply_customvit.py` / `clip_encoder.py`. Its rules, for one anyres image (the thumbnail = the base
image, side x side tokens; crops on a rows x cols tile grid) and retention ratio r:

- score: the [CLS] query's row of the LAST vision layer (not the feature layer), taken before the
  softmax -- q_cls . k * scale, averaged over the heads ("cls_logits"); each crop's own row, and
  the thumbnail's;
- thumbnail: keeps the int(side^2 * r) tokens of highest score, in descending score order;
- crop budgets: the thumbnail's scores summed over the block of it each tile covers (blocks of
  max(side // rows, 1) x max(side // cols, 1) tokens, the last tile row / column taking the
  remainder); p = softmax(sums / 10); crop c keeps int(N_c * min(1, r * (1 + p_c - mean p)))
  of its N_c tokens left after unpadding;
- inside a crop: the thumbnail's scores, bilinearly resized (align_corners=False) to the
  unpadded crop grid, cut to the crop's part; the crop's own scores and that part each
  L2-normalised and added; top-k; kept tokens stay in raster order with the image_newline of
  every row.

Departures: a forced one -- the release puts a newline after every row of the padded crop grid
(padding rows included), LLaVA-NeXT in transformers after every row of the unpadded one, which
is kept here (all of them, as the release keeps all of its). Named ones: `keep=1.0` keeps every
token (the release at ratio 1 still drops tokens of the crops below the mean, since the crops
above it are clipped at 1); each image of a batch uses its own scores (the release reuses the
first image's); an int `keep` is a count, turned into the ratio keep / (base + crop tokens);
`layout="raster"` (automatic under positions="original") puts the thumbnail's tokens in raster
order; `score="softmax"` uses the attention probabilities instead of the logits; `layers` and
`temperature`. An image without crops passes unpruned, as in the release. LLaVA-NeXT only
(`families`); the counts depend on the image, so not on the vLLM plugin.

The engine hands the method a whole image (`reduce_image`, see
`patches.image_tokens._reduced_per_image`): the base image's region, one region per crop (the
`per_crop` layout) and the crop grid (`ImageTokens.tiles`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..config import Option, choice, optional_int_list
from ..registry import register_method
from .base import Reduction, VisionMethod, keep_top_k, layout_option, resolve_layout


def _positive(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be a number")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive number")
    return float(value)


def crop_ratios(thumbnail: torch.Tensor, tiles: tuple[int, int], ratio: float, temperature: float) -> list[float]:
    """Retention ratio of each tile (raster order over the tile grid) from the thumbnail's scores
    [side, side]: block sums, softmax at `temperature`, ratio * (1 + p - mean p) clipped at 1."""
    rows, cols = tiles
    side_h, side_w = thumbnail.shape
    row_tile = (torch.arange(side_h) // max(side_h // rows, 1)).clamp(max=rows - 1)
    col_tile = (torch.arange(side_w) // max(side_w // cols, 1)).clamp(max=cols - 1)
    tile = (row_tile[:, None] * cols + col_tile[None, :]).flatten().to(thumbnail.device)
    sums = torch.zeros(rows * cols, dtype=torch.float64, device=thumbnail.device)
    sums.index_add_(0, tile, thumbnail.flatten().double())
    exp = torch.exp((sums - sums.max()) / temperature)
    p = exp / (exp.sum() + 1e-8)
    return (ratio * (1 + p - p.mean())).clamp(max=1.0).tolist()


@register_method
class GlobalCom2(VisionMethod):
    name = "globalcom2"
    needs = frozenset({"cls_attention", "cls_logits"})
    families = ("llava_next",)  # the engine refuses the others when patching
    default_budget = "per_crop"  # the regions: the base image and each crop; their budgets are the method's
    paper = "GlobalCom² (arXiv 2501.05179, AAAI 2026)"
    release = ("github xuyang-liu16/GlobalCom2 @ 96b2d00, llava/model/llava_arch.py (compress_thumbnail, "
               "generate_scale_for_crop_features, compress_crops, select_topk_crop_features), "
               "llava/model/multimodal_encoder/apply_customvit.py")
    options = {
        "layers": Option((-1,), optional_int_list,
                         "vision layers (0-based, negative from the end) whose [CLS] rows are summed; "
                         "(-1,) = the last layer (the release); None = the layer producing the LLM's features"),
        "score": Option("logits", choice("logits", "softmax"),
                        "'logits': the [CLS] row before the softmax, heads averaged (the release); "
                        "'softmax': the attention probabilities"),
        "temperature": Option(10.0, _positive, "temperature of the softmax over the tiles' summed thumbnail scores"),
        "layout": layout_option("the thumbnail's tokens by descending score, then the crops' in raster order"),
    }

    def cls_score(self, options):
        return options["layers"], False

    def resolve_options(self, options, positions):
        return resolve_layout(options, positions, self.name, "orders the thumbnail's tokens by score")

    def output_count(self, k, grid, options):
        return None  # the crops' budgets depend on the thumbnail

    def _scores(self, signals: Mapping[str, torch.Tensor], options) -> torch.Tensor:
        return signals["cls_logits" if options["score"] == "logits" else "cls_attention"].float()

    def reduce(self, features, grid, k, signals, options) -> Reduction:
        """One region alone (no tiles): the thumbnail's rule with budget k."""
        scores = self._scores(signals, options)
        if options["layout"] == "release":
            order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
            return Reduction(features.gather(1, order[..., None].expand(-1, -1, features.shape[-1])),
                             order.sort(dim=1).values)
        index = keep_top_k(scores, k)
        return Reduction(features.gather(1, index[..., None].expand(-1, -1, features.shape[-1])), index)

    def reduce_image(self, image, keep, options) -> list[Reduction]:
        """One LLaVA-NeXT image: its base region first, then one region per crop."""
        regions = image.regions
        feats = image.features
        total = sum(region.size for region in regions)
        ratio = keep if isinstance(keep, float) else min(1.0, keep / max(total, 1))
        crops = regions[1:]
        if ratio >= 1.0 or not crops:  # keep=1.0 keeps all; an image without crops passes whole (release)
            return [_selection(feats, region, torch.arange(region.size, device=feats.device)) for region in regions]
        if image.tiles is None:
            raise ValueError("globalcom2 needs the crop grid of each image (ImageTokens.tiles)")
        scores = self._scores(image.signals, options)
        base = regions[0]
        thumb = scores[base.slots]
        # the thumbnail: its own top int(N * r), by descending score (layout "release")
        order = torch.argsort(thumb, descending=True, stable=True)[:int(base.size * ratio)]
        out = [_selection(feats, base, order.sort().values,
                          order if options["layout"] == "release" else None)]
        rows, cols = image.tiles
        ratios = crop_ratios(thumb.view(base.grid), (rows, cols), ratio, options["temperature"])
        # where each crop's unpadded part lies in the unpadded crop grid
        heights, widths = [0] * rows, [0] * cols
        for region in crops:
            r, c = divmod(region.crop - 1, cols)
            heights[r], widths[c] = region.grid
        top = [sum(heights[:r]) for r in range(rows)]
        left = [sum(widths[:c]) for c in range(cols)]
        guide = F.interpolate(thumb.view(1, 1, *base.grid), size=(sum(heights), sum(widths)),
                              mode="bilinear", align_corners=False)[0, 0]
        for region in crops:
            r, c = divmod(region.crop - 1, cols)
            h, w = region.grid
            part = guide[top[r]:top[r] + h, left[c]:left[c] + w].flatten()
            combined = F.normalize(scores[region.slots], dim=0) + F.normalize(part, dim=0)
            k = int(region.size * ratios[r * cols + c])
            index = torch.argsort(combined, descending=True, stable=True)[:k].sort().values
            out.append(_selection(feats, region, index))
        return out


def _selection(features: torch.Tensor, region, index: torch.Tensor, order: torch.Tensor | None = None) -> Reduction:
    """The region's tokens at `index` (increasing), as a group of one; `order`: the same tokens
    in the order the LLM gets them, when not raster."""
    picked = features[region.slots[order if order is not None else index]]
    return Reduction([picked], [index])
