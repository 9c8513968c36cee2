"""`visionzip`: VisionZip -- dominant tokens by [CLS] attention + contextual tokens merged by key similarity.

Of the budget k, round(k * 10 / 64) are contextual (VisionZip's 54 + 10 at 64, proportional
at other budgets) and the rest dominant: the tokens the [CLS] query attends to most. The
remaining tokens are merged into the contextual ones: targets are spread uniformly over the
remaining tokens (every m-th in raster order), every other remaining token joins the target
whose key is most similar (cosine), and a contextual token is the mean of its group. Keys come
from the same vision layer as the attention (Qwen: the last block, pooled per 2x2 unit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import register_method
from .base import Reduction, VisionMethod, keep_top_k

CONTEXTUAL_OF_64 = 10


def contextual_count(k: int) -> int:
    return min(k - 1, round(k * CONTEXTUAL_OF_64 / 64)) if k > 1 else 0


def merge_into_targets(features: torch.Tensor, keys: torch.Tensor, rest: torch.Tensor, n_targets: int):
    """Merges the `rest` tokens [I, R] into n_targets spread uniformly over them.

    Returns (merged features [I, n_targets, D], target indices [I, n_targets]).
    """
    n_images, n_rest = rest.shape
    picks = torch.linspace(0, n_rest - 1, n_targets, device=rest.device).round().long()
    targets = rest[:, picks]
    dim = features.shape[-1]
    rest_feats = features.gather(1, rest[..., None].expand(-1, -1, dim)).float()
    rest_keys = F.normalize(keys.gather(1, rest[..., None].expand(-1, -1, keys.shape[-1])).float(), dim=-1)
    similarity = rest_keys @ rest_keys[:, picks].transpose(1, 2)  # [I, R, n_targets]
    group = similarity.argmax(-1)
    group[:, picks] = torch.arange(n_targets, device=rest.device)  # a target is in its own group
    sums = torch.zeros(n_images, n_targets, dim, device=features.device).scatter_add_(
        1, group[..., None].expand(-1, -1, dim), rest_feats)
    counts = torch.zeros(n_images, n_targets, device=features.device).scatter_add_(
        1, group, torch.ones_like(group, dtype=torch.float32))
    return (sums / counts[..., None]).to(features.dtype), targets


@register_method
class VisionZip(VisionMethod):
    name = "visionzip"
    needs = frozenset({"cls_attention", "keys"})
    paper = "VisionZip: Longer is Better but Not Necessary in Vision Language Models (CVPR 2025)"

    def reduce(self, features, grid, k, signals, options) -> Reduction:
        n_images, n_tokens, dim = features.shape
        n_context = contextual_count(k) if k < n_tokens else 0
        dominant = keep_top_k(signals["cls_attention"], k - n_context)
        if n_context == 0:
            index = dominant
            return Reduction(features.gather(1, index[..., None].expand(-1, -1, dim)), index)
        taken = torch.zeros(n_images, n_tokens, dtype=torch.bool, device=features.device)
        taken.scatter_(1, dominant, True)
        rest = (~taken).nonzero()[:, 1].view(n_images, -1)
        merged, targets = merge_into_targets(features, signals["keys"], rest, n_context)
        index = torch.cat([dominant, targets], 1)
        feats = torch.cat([features.gather(1, dominant[..., None].expand(-1, -1, dim)), merged], 1)
        order = index.argsort(dim=1)
        return Reduction(feats.gather(1, order[..., None].expand(-1, -1, dim)), index.gather(1, order))
