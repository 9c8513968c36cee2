"""`divprune`: DivPrune -- keep a maximally diverse subset (max-min diversity, greedy).

Distance = cosine distance between the visual tokens (the LLM-space features). The first token
is the most isolated one (the largest distance to its nearest neighbour); then, repeatedly, the
token whose distance to its nearest already-kept token is largest. Raster order is restored.
Greedy farthest-point selection is DivPrune's solver for the max-min diversity problem.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import register_method
from .base import Reduction, VisionMethod, gather_tokens


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """features [I, N, D] -> [I, k] indices (increasing) of a greedy max-min diverse subset."""
    n_images, n_tokens, _ = features.shape
    unit = F.normalize(features.float(), dim=-1)
    distance = 1 - unit @ unit.transpose(1, 2)  # [I, N, N]
    rows = torch.arange(n_images, device=features.device)
    isolation = distance + torch.eye(n_tokens, device=features.device) * 4  # ignore self
    first = isolation.min(-1).values.argmax(-1)
    chosen = [first]
    nearest = distance[rows, first]  # [I, N] distance to the closest kept token
    for _ in range(1, k):
        nearest = nearest.clone()
        nearest[rows[:, None], torch.stack(chosen, 1)] = -1.0  # never pick a kept token again
        pick = nearest.argmax(-1)
        chosen.append(pick)
        nearest = torch.minimum(nearest, distance[rows, pick])
    return torch.stack(chosen, 1).sort(dim=-1).values


@register_method
class DivPrune(VisionMethod):
    name = "divprune"
    paper = "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (CVPR 2025)"
    release = "github vbdi/divprune @ 799e2d9, LLaVA/llava/model/llava_arch.py DivPrune"
    # LLaVA-NeXT: the release selects from the whole image (base, crops, newlines) as one pool
    default_budget = "pooled"

    def reduce(self, features, grid, k, signals, options) -> Reduction:
        return gather_tokens(features, max_min_diverse(features, k))
