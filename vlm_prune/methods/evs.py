"""`evs`: Efficient Video Sampling -- drop the video tokens that barely change from the previous
frame at the same place.

The rule, as vLLM implements it for Qwen2.5-VL / Qwen3-VL (`--video-pruning-rate q`, module
`vllm/multimodal/video_prune/evs.py` of vllm 0.32; written here from the rule, not copied):

- a video's merged tokens form a (t, h, w) grid; each token of frame f > 0 scores
  1 - cos(token, the token at the same place in frame f - 1) (cosine over the feature dim, in
  the features' dtype); every token of the first frame scores 255, so the first frame is kept
  whole;
- the tokens are ranked by score, descending, ties in raster (t, h, w) order (a stable sort);
- the first max(h * w, floor(N * (1 - q))) of the ranking are kept (N = t * h * w), in their
  original order.

Configured the same way -- keep = 1 - q as a float, `video_budget="per_video"` (the default
here) -- the kept set equals vLLM's. What vlm_prune adds: the same rule on Qwen2-VL and on the
transformers path, an int `keep` (tokens per video), and the count checked before the encoder
(vLLM reserves the placeholders up front). Images (one frame, nothing to compare with) and
frames reduced alone (`video_budget="per_frame"`, refused) are left whole.

The grid a region gives is (t, h, w) for a whole video, (h, w) for an image or one frame.
"""

from __future__ import annotations

import math

import torch

from ..registry import register_method
from .base import Reduction, VisionMethod, gather_tokens

FIRST_FRAME_SCORE = 255.0  # above any 1 - cos (at most 2): the first frame always ranks first


def temporal_scores(features: torch.Tensor, frames: int) -> torch.Tensor:
    """features [I, N, D] of videos of `frames` frames (N = frames * per-frame tokens, raster
    order) -> [I, N]: 1 - cos with the same place in the previous frame; FIRST_FRAME_SCORE in the
    first frame."""
    videos, n, dim = features.shape
    grid = features.view(videos, frames, n // frames, dim)
    change = 1 - torch.nn.functional.cosine_similarity(grid[:, 1:], grid[:, :-1], dim=-1)
    first = torch.full_like(grid[:, :1, :, 0], FIRST_FRAME_SCORE)
    return torch.cat([first, change], dim=1).flatten(1)


@register_method
class EVS(VisionMethod):
    name = "evs"
    paper = "Efficient Video Sampling (NVIDIA; vLLM's --video-pruning-rate)"
    release = "vllm-project/vllm v0.32.0, vllm/multimodal/video_prune/evs.py"
    video_budgets = ("per_video",)
    budget_rounding = "floor"

    def output_count(self, k, grid, options) -> int:
        if len(grid) != 3:  # an image: left whole
            return math.prod(grid)
        return max(min(k, math.prod(grid)), grid[1] * grid[2])

    def reduce(self, features, grid, k, signals, options) -> Reduction:
        n_images, n_tokens = features.shape[:2]
        count = self.output_count(k, grid, options)
        if count >= n_tokens:
            index = torch.arange(n_tokens, device=features.device).expand(n_images, -1)
            return Reduction(features, index)
        order = torch.sort(temporal_scores(features, grid[0]), dim=1, descending=True, stable=True).indices
        return gather_tokens(features, order[:, :count].sort(dim=1).values)
