"""`text_recovery`: Recoverable Compression -- [CLS] filter, text-guided recovery, merging.

The released rules (github banjiuyufen/Recoverable-Compression @ d927594,
llava/model/multimodal_encoder/clip_encoder.py: `token_recycling_with_text_in_vision_and_clustring`,
`find_max_derivative_position`, `get_score_by_text`), per image of N tokens:

1. Score: the [CLS] row of the LAST vision layer's attention taken as one head over the full
   width -- softmax(q_cls . K^T / sqrt(width)) of that layer's raw q/k projections.
2. Visual filter: a local outlier factor test (k = 20) on the N scores; its outliers, on both
   tails, as a fraction of N, set the count n_v = int(N * fraction); the n_v highest scores are
   kept.
3. Text recovery: s = cosine(question, token). The kept tokens' s is set to min(s), the same
   outlier test (k = 20) on the whole vector gives a fraction, n_t = int((N - n_v) * fraction),
   and the n_t highest s among the rest come back.
4. Merge: of the remaining tokens O, an outlier test (k = 10) on their scores sets the number of
   cluster centres (the highest-scored of O); each centre absorbs the 32 tokens of O most like it
   (cosine of the score layer's keys + 50 / sqrt(768) * s) weighted by their scores; one summary
   token is the score-weighted mean of O's non-centres.
5. The LLM receives the kept and recovered tokens in raster order, then the centres in descending
   score order, then the summary token (none when there is no centre); all of it made from the
   feature layer's tokens before the projector, which then projects them.

Departures, each forced or a fix:
- The question: the release embeds the prompt's text with CLIP's text tower, which LLaVA and
  Qwen checkpoints do not ship; here it is the mean of the LLM's own input embeddings of the
  instruction (the prompt's text after its last image), compared with the projected tokens.
- Bugs of the release not reproduced: the centre count is taken from O (the release reads the
  feature width, 1024, and can ask for more centres than tokens); each centre uses its own keys
  (the release looks them up with indices of another frame); the merges are weighted means
  (centre + the score-weighted mean of its members; summary = score-weighted mean) where the
  release sums without dividing; a recovered token is never one already kept (the release can
  pick a kept token twice through the ties at min(s)).
- `keep` caps the total (the release has no budget): when the counts exceed it, centres go
  first, then recovered tokens, then kept ones; keep=1.0 keeps everything unchanged.
- positions="original" (or Qwen-VL) needs tokens at positions of their own: the output is then
  in raster order of what each token stands for (a centre: itself; the summary: O's
  highest-scored non-centre). Qwen-VL has no [CLS]: its fallback score (attention received)
  replaces step 1's.

Options: `score="fastervlm"` scores with the layer that feeds the LLM, heads averaged (the
project's earlier score); `mode="fixed"` keeps exactly `keep` tokens (a fixed-budget variant:
1 summary, a share `keep_share` of the rest by score, the others recovered by the question, the
remaining tokens merged into the nearest survivor by cosine, weighted by score).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import Option, choice
from ..registry import register_method
from .base import Reduction, VisionMethod, layout_option, resolve_layout

MEMBERS = 32  # tokens each centre absorbs
TEXT_WEIGHT = 50 / math.sqrt(768)  # the release's weight of the text score in the merge (cosine * 768^-0.5 * 50)


def _check_share(name, value):
    from ..config import is_number

    if not is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
    return float(value)


def local_outlier_factor(values: torch.Tensor, k: int = 20) -> torch.Tensor:
    """LOF of each point (scikit-learn's definition). values: [N, d] (or [N]); returns [N]
    (about 1 inside clusters, > 1 for outliers). Neighbours exclude the point itself."""
    x = values.double().view(values.shape[0], -1)
    n = x.shape[0]
    k = max(1, min(k, n - 1))
    distance = torch.cdist(x, x)
    distance.fill_diagonal_(float("inf"))
    knn_distance, knn = distance.sort(dim=1, stable=True)  # ties go to the lower index
    knn_distance, knn = knn_distance[:, :k], knn[:, :k]
    k_distance = knn_distance[:, -1]
    reach = torch.maximum(k_distance[knn], knn_distance)
    density = 1.0 / (reach.mean(1) + 1e-10)
    return density[knn].mean(1) / density


def outlier_count(values: torch.Tensor, k: int) -> int:
    """How many of the values are LOF outliers (scikit-learn's contamination="auto": LOF > 1.5),
    on both tails, as the release turns them into a count of N: int(N * (outliers / N))."""
    n = values.numel()
    if n < 2:
        return 0
    outliers = int((local_outlier_factor(values, k) > 1.5).sum())
    return int(n * (outliers / n))


@register_method
class TextRecovery(VisionMethod):
    name = "text_recovery"
    needs = frozenset({"cls_attention", "question", "keys", "llm_features"})
    optional_needs = frozenset({"llm_features"})
    uses_pre_projection = True
    paper = "Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by Text Information (AAAI 2025)"
    release = ("github banjiuyufen/Recoverable-Compression @ d927594, llava/model/multimodal_encoder/"
               "clip_encoder.py token_recycling_with_text_in_vision_and_clustring")
    options = {
        "mode": Option("adaptive", choice("adaptive", "fixed"),
                       "'adaptive': the release's outlier-based counts, capped by keep; 'fixed': exactly keep tokens"),
        "score": Option("release", choice("release", "fastervlm"),
                        "'release': the last vision layer's [CLS] row as one head over the full width; "
                        "'fastervlm': the feature layer's, heads averaged"),
        "keep_share": Option(0.75, _check_share, "fixed mode: share of the non-summary tokens kept by score "
                                                 "(the rest are recovered)"),
        "layout": layout_option("kept and recovered (raster), centres, summary"),
    }

    def cls_score(self, options):
        return ((-1,), True) if options["score"] == "release" else (None, False)

    def resolve_options(self, options, positions):
        return resolve_layout(options, positions, "text_recovery", "puts the merged tokens after the kept ones")

    def output_count(self, k, grid, options):
        return None if options["mode"] == "adaptive" else min(k, grid[0] * grid[1])

    def reduce(self, features, grid, k, signals, options) -> Reduction:
        attention = signals["cls_attention"].float()
        llm = signals.get("llm_features", features).float()
        similarity = F.cosine_similarity(llm, signals["question"].float()[:, None, :].to(llm.device), dim=-1)
        one = self._adaptive if options["mode"] == "adaptive" else self._fixed
        keys = signals.get("keys")  # the merge's (adaptive mode)
        outputs = [one(features[i], attention[i], similarity[i], None if keys is None else keys[i], k, options)
                   for i in range(features.shape[0])]
        if len({len(idx) for _, idx in outputs}) == 1:
            return Reduction(torch.stack([f for f, _ in outputs]), torch.stack([i for _, i in outputs]))
        return Reduction([f for f, _ in outputs], [i for _, i in outputs])

    # -- the release (adaptive counts) ------------------------------------------------------

    def _adaptive(self, feats, attention, similarity, keys, k, options):
        n = feats.shape[0]
        if k >= n:
            return feats, torch.arange(n, device=feats.device)
        n_v = outlier_count(attention, 20)
        visual = attention.topk(n_v).indices if n_v else attention.new_zeros(0, dtype=torch.long)
        marked = similarity.clone()
        marked[visual] = similarity.min()
        n_t = int((n - n_v) * (outlier_count(marked, 20) / n))
        taken = torch.zeros(n, dtype=torch.bool, device=feats.device)
        taken[visual] = True
        recovered = marked.masked_fill(taken, float("-inf")).topk(min(n_t, n - n_v)).indices
        rest = (~taken).nonzero().flatten()
        rest = rest[~torch.isin(rest, recovered)]
        n_c = outlier_count(attention[rest], 10) if len(rest) else 0
        # the cap: centres first, then recovered tokens, then kept ones (the summary counts one)
        n_c = min(n_c, max(0, k - n_v - len(recovered) - 1))
        recovered = recovered[: max(0, min(len(recovered), k - n_v - (1 if n_c else 0)))]
        visual = visual[: min(n_v, k)]
        kept = torch.zeros(n, dtype=torch.bool, device=feats.device)
        kept[visual] = True
        kept[recovered] = True
        kept_index = kept.nonzero().flatten()
        rest = (~kept).nonzero().flatten()
        parts, slots = [feats[kept_index].float()], [kept_index]
        if n_c:
            merged, merged_slots = _merge(feats, attention, similarity, keys, rest, n_c)
            parts.append(merged)
            slots.append(merged_slots)
        out, index = torch.cat(parts), torch.cat(slots)
        if options["layout"] == "raster":
            order = index.argsort()
            return out[order].to(feats.dtype), index[order]
        return out.to(feats.dtype), index.sort().values

    # -- a fixed budget (a departure) --------------------------------------------------------

    def _fixed(self, feats, attention, similarity, keys, k, options):
        n = feats.shape[0]
        if k >= n:
            return feats, torch.arange(n, device=feats.device)
        survivors = k - 1 if k > 1 else 1
        n_keep = min(survivors, max(1, round(survivors * options["keep_share"])))
        kept = torch.zeros(n, dtype=torch.bool, device=feats.device)
        kept[attention.topk(n_keep).indices] = True
        if survivors > n_keep:
            kept[similarity.masked_fill(kept, float("-inf")).topk(survivors - n_keep).indices] = True
        survivor_index = kept.nonzero().flatten()
        rest_index = (~kept).nonzero().flatten()
        out = feats[survivor_index].float()
        if not len(rest_index) or k == 1:
            return out.to(feats.dtype), survivor_index
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


def _merge(feats, attention, similarity, keys, rest, n_centres):
    """Step 4 on the remaining tokens `rest` [R] (raster order): ([n_centres + 1, D] float32 --
    the centres in descending score order, then the summary -- and the slots they stand for)."""
    scores = attention[rest]
    order = scores.topk(n_centres).indices  # positions in `rest`, descending score
    centres = rest[order]
    x = feats[rest].float()
    unit = F.normalize(keys[rest].float(), dim=-1)
    merged = []
    for j in order.tolist():
        candidates = torch.arange(len(rest), device=rest.device)
        candidates = candidates[candidates != j]
        affinity = unit[candidates] @ unit[j] + TEXT_WEIGHT * similarity[rest[candidates]].float()
        members = candidates[affinity.topk(min(MEMBERS, len(candidates))).indices]
        weights = scores[members]
        merged.append(x[j] + (weights[:, None] * x[members]).sum(0) / weights.sum().clamp(min=1e-12))
    others = torch.ones(len(rest), dtype=torch.bool, device=rest.device)
    others[order] = False
    weights = scores[others]
    if others.any():
        summary = (weights[:, None] * x[others]).sum(0) / weights.sum().clamp(min=1e-12)
        summary_slot = rest[others][weights.argmax()]
        return torch.cat([torch.stack(merged), summary[None]]), torch.cat([centres, summary_slot[None]])
    return torch.stack(merged), centres
