"""`random`: a seeded random subset of the visual tokens (a control every method must beat)."""

from __future__ import annotations

import torch

from ..config import Option, integer
from ..registry import register_method
from .base import Reduction, VisionMethod, gather_tokens


@register_method
class RandomSelect(VisionMethod):
    name = "random"
    paper = "control (UniPruneBench finds random a strong baseline)"
    options = {
        "seed": Option(0, integer(), "seed of the subset; the subset depends only on seed and "
                       "the image's token count, so it is reproducible and batch-independent"),
    }

    def reduce(self, features, grid, k, signals, options) -> Reduction:
        n_images, n_tokens = features.shape[:2]
        generator = torch.Generator().manual_seed(options["seed"])
        subset = torch.randperm(n_tokens, generator=generator)[:k].sort().values
        index = subset.to(features.device).expand(n_images, -1).clone()
        return gather_tokens(features, index)
