"""`pool`: uniform spatial pooling (mode="avg") or subsampling (mode="subsample") of the grid.

The h x w grid is reduced to an r x c grid with r * c <= keep and r / c close to h / w:
r = round(sqrt(keep * h / w)), c = keep // r, both clamped to the grid. Each output token
stands for one cell of the adaptive-pooling partition (cells as in adaptive_avg_pool2d);
"avg" averages the cell, "subsample" takes its centre token. The centre token is the
representative whose position id the output token gets under positions="original".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import Option, choice
from ..registry import register_method
from .base import Reduction, VisionMethod, gather_tokens


def pooled_grid(k: int, h: int, w: int) -> tuple[int, int]:
    """Output grid (rows, cols) for a budget of k tokens on an h x w grid."""
    rows = min(h, max(1, round(math.sqrt(k * h / w))))
    cols = min(w, max(1, k // rows))
    rows = min(h, max(1, k // cols))
    return rows, cols


def cell_centres(size: int, cells: int) -> torch.Tensor:
    """Centre index of each adaptive-pooling cell along one axis: [cells] int64, increasing."""
    i = torch.arange(cells)
    start = (i * size) // cells
    end = -((-(i + 1) * size) // cells)  # ceil
    return (start + end - 1) // 2


def coarse_grid(k: int, grid: tuple[int, int], n_images: int, device) -> tuple[int, int, torch.Tensor]:
    """(rows, cols, index [n_images, rows * cols]): the output grid for budget k and the centre
    token each output cell stands for (increasing, raster order)."""
    h, w = grid
    rows, cols = pooled_grid(k, h, w)
    centre = cell_centres(h, rows)[:, None] * w + cell_centres(w, cols)[None, :]
    return rows, cols, centre.reshape(1, -1).to(device).expand(n_images, -1).clone()


class CoarseGridMethod(VisionMethod):
    """Methods whose output is a coarser grid: the count is known from the budget alone."""

    output_is_grid = True

    def output_grid(self, k, grid, options):
        return pooled_grid(k, *grid)

    def output_count(self, k, grid, options):
        rows, cols = pooled_grid(k, *grid)
        return rows * cols


@register_method
class Pool(CoarseGridMethod):
    name = "pool"
    paper = "control (uniform spatial pooling / subsampling)"
    options = {
        "mode": Option("avg", choice("avg", "subsample"), "average each cell or take its centre token"),
    }

    def reduce(self, features, grid, k, signals, options) -> Reduction:
        h, w = grid
        n_images, _, dim = features.shape
        rows, cols, index = coarse_grid(k, grid, n_images, features.device)
        if options["mode"] == "subsample":
            return gather_tokens(features, index)
        as_image = features.transpose(1, 2).reshape(n_images, dim, h, w)
        pooled = F.adaptive_avg_pool2d(as_image.float(), (rows, cols)).to(features.dtype)
        return Reduction(features=pooled.flatten(2).transpose(1, 2), index=index)
