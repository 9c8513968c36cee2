"""`text_recovery`: Recoverable Compression -- [CLS] filter, text-guided recovery, merging.

1. Visual filter: the tokens the vision tower's [CLS] query attends to most are kept.
2. Text recovery: of the rest, the tokens most similar (cosine) to the question come back. The
   question embedding is the model's own: the mean of the LLM input embeddings of the
   instruction tokens (the prompt's text after the image's row's last image; all of the row's
   text if none follows), compared with the projected visual tokens in the LLM's input space.
3. Merge: every remaining token is merged into the kept or recovered token it is most similar
   to (PruMerge-style: each survivor becomes the [CLS]-attention-weighted mean of itself and the
   tokens it absorbs), plus one summary token, the [CLS]-weighted mean of all remaining tokens
   (placed at the slot of the remaining token with the highest attention).

mode="fixed" (default): exactly `keep` tokens: 1 summary, and of the other keep - 1 a share
`keep_share` (default 0.75) kept by attention and the rest recovered by the question.
mode="adaptive" (the paper's): counts from an outlier test (local outlier factor, k=20, on the
attention scores, then on the question similarities; outliers above the median count), capped
by `keep`. Deviation: tokens stay in raster order (the merged summary sits at its slot), where
the paper appends merged tokens after the kept ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Option, choice
from ..registry import register_method
from .base import Reduction, VisionMethod


def _check_share(name, value):
    from ..config import is_number

    if not is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
    return float(value)


def local_outlier_factor(values: torch.Tensor, k: int = 20) -> torch.Tensor:
    """LOF of each point. values: [N, d] (or [N]); returns [N] (about 1 inside clusters, > 1 outliers)."""
    x = values.float().view(values.shape[0], -1)
    n = x.shape[0]
    k = max(1, min(k, n - 1))
    distance = torch.cdist(x, x)
    distance.fill_diagonal_(float("inf"))
    knn_distance, knn = distance.sort(dim=1, stable=True)  # ties go to the lower index
    knn_distance, knn = knn_distance[:, :k], knn[:, :k]
    k_distance = knn_distance[:, -1]
    reach = torch.maximum(k_distance[knn], knn_distance)
    density = 1.0 / (reach.mean(1) + 1e-12)
    return density[knn].mean(1) / density


def outlier_count(scores: torch.Tensor, k: int = 20, threshold: float = 1.5) -> int:
    """Points that are LOF outliers and above the median: the paper's adaptive count."""
    if scores.numel() < 3:
        return int(scores.numel())
    lof = local_outlier_factor(scores, k)
    return int(((lof > threshold) & (scores > scores.median())).sum())


@register_method
class TextRecovery(VisionMethod):
    name = "text_recovery"
    needs = frozenset({"cls_attention", "question"})
    paper = "Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by Text Information (AAAI 2025)"
    options = {
        "mode": Option("fixed", choice("fixed", "adaptive"), "'fixed': exactly keep tokens; 'adaptive': outlier-based counts capped by keep"),
        "keep_share": Option(0.75, _check_share, "fixed mode: share of the non-summary tokens kept by [CLS] attention (the rest are recovered)"),
    }

    def output_count(self, k, grid, options):
        return None if options["mode"] == "adaptive" else min(k, grid[0] * grid[1])

    def reduce(self, features, grid, k, signals, options) -> Reduction:
        attention = signals["cls_attention"].float()
        similarity = F.cosine_similarity(features.float(), signals["question"].float()[:, None, :], dim=-1)
        outputs = [self._one(features[i], attention[i], similarity[i], k, options) for i in range(features.shape[0])]
        if len({len(idx) for _, idx in outputs}) == 1:
            return Reduction(torch.stack([f for f, _ in outputs]), torch.stack([i for _, i in outputs]))
        return Reduction([f for f, _ in outputs], [i for _, i in outputs])

    def _one(self, feats, attention, similarity, k, options):
        n = feats.shape[0]
        if k >= n:
            return feats, torch.arange(n, device=feats.device)
        survivors = k - 1 if k > 1 else 1
        if options["mode"] == "fixed":
            n_keep = max(1, round(survivors * options["keep_share"])) if survivors > 0 else 0
            n_keep = min(n_keep, survivors)
        else:
            n_keep = min(survivors, max(1, outlier_count(attention)))
        kept = torch.zeros(n, dtype=torch.bool, device=feats.device)
        kept[attention.topk(n_keep).indices] = True
        rest_similarity = similarity.masked_fill(kept, float("-inf"))
        if options["mode"] == "fixed":
            n_recover = survivors - n_keep
        else:
            n_recover = min(survivors - n_keep, outlier_count(similarity[~kept]))
        if n_recover > 0:
            kept[rest_similarity.topk(n_recover).indices] = True
        survivor_index = kept.nonzero().flatten()
        rest_index = (~kept).nonzero().flatten()
        out = feats[survivor_index].float()
        if len(rest_index) and k > 1:
            weights = attention[rest_index].clamp(min=0) + 1e-12
            unit = F.normalize(feats.float(), dim=-1)
            owner = (unit[rest_index] @ unit[survivor_index].T).argmax(-1)
            own_w = attention[survivor_index].clamp(min=0) + 1e-12
            sums = out * own_w[:, None]
            sums.index_add_(0, owner, feats[rest_index].float() * weights[:, None])
            totals = own_w.clone().index_add_(0, owner, weights)
            out = sums / totals[:, None]
            summary = (feats[rest_index].float() * weights[:, None]).sum(0) / weights.sum()
            summary_slot = rest_index[attention[rest_index].argmax()]
            index = torch.cat([survivor_index, summary_slot[None]])
            out = torch.cat([out, summary[None]])
            order = index.argsort()
            return out[order].to(feats.dtype), index[order]
        return out.to(feats.dtype), survivor_index
