"""`fopru`: Focal Pruning -- keep the visual tokens of highest attention-based significance in the
vision encoder, either the top tokens overall ("rank") or whole rows of the grid ("row"), in
their original order.

Paper: FoPru: Focal Pruning for Efficient Large Vision-Language Models (Jiang, Huang, Liu, Zeng,
Li, Cheng, Xu; arXiv 2411.14164, 2024). The paper links no code. The one public implementation
found is by its authors' group (USTC; Tongxuan Liu, Yuting Zeng and Jing Li co-wrote both):
`focal_prunning` in the HydraInfer serving system, github dongxianzhe/hydrainfer @ d4d5f4f
(`hydrainfer/layer/token_prunning.py`; wired into LLaVA-1.5 at fb75c7a, `dxz/model/llava.py`
`image_embed`, with `strategy='rank'`). Its rules, written here from scratch:

1. Significance: the attention map of the vision layer whose output feeds the LLM (LLaVA's
   `vision_feature_layer`), [CLS] row and column dropped (patch tokens only), averaged over
   heads; each patch's significance is the mean of its column -- the attention it receives,
   averaged over the query patches. (HydraInfer takes the column mean or the row mean,
   whichever varies more; on softmax attention the row mean is the constant 1/N, so the column
   mean is what it picks. It applies the rule to the pre-softmax logits, which we treat as an
   implementation slip.)
2. "rank": the k most significant tokens (`k` = the budget).
3. "row": the grid's rows ranked by their summed significance; the floor(h * k / N) = k // w top
   rows are kept whole (runs of w consecutive tokens).
4. The kept tokens go to the projector and the LLM in their original (raster) order.

The significance comes from the family's "cls_attention" signal:

- Qwen-VL: the attention each patch receives in the last vision block, averaged over heads and
  the image's query rows, then over each 2x2 merge unit -- FoPru's significance (the last block
  feeds the merger).
- LLaVA / LLaVA-NeXT: the [CLS] query's row in the feature layer (heads averaged). A forced
  departure: the adapters give no received-attention score for a CLIP tower (only the [CLS]
  row and head-averaged keys), so the closest existing signal stands in for the column mean.
  `layers=[...]` sums the [CLS] rows of other layers instead.

Choices where the paper and the implementation are silent, each a named option:

- `strategy`: "rank" (default: HydraInfer's wiring; the paper's first strategy) or "row".
- `remainder` (row only): the k - (k // w) w tokens a whole number of rows leaves over.
  "drop" (default): whole rows only, so the count is (k // w) w <= k, the implementation's
  count; when k < w (no whole row fits) the k tokens are one run, as under "run" (the
  implementation keeps nothing there). "run": also keep the consecutive run of that length with
  the highest summed significance in a row not kept (exactly k tokens).
- Ties (equal significance or row sums) go to the lower index (the implementation's unstable
  sort leaves them open).
- Videos: the rows of a region are its frames' rows in order ((t h) rows of w for a whole
  video under `video_budget="per_video"`, h rows per frame under "per_frame").
- LLaVA-NeXT: the library's default `budget="per_image"` (the base image, then the unpadded
  crop grid whose rows run across the image); `"per_crop"` ranks within each crop.
"""

from __future__ import annotations

import math

import torch

from ..config import Option, choice, optional_int_list
from ..registry import register_method
from .base import Reduction, VisionMethod, gather_tokens


def row_plan(k: int, grid: tuple[int, ...], remainder: str) -> tuple[int, int, int]:
    """(width w of a row, whole rows kept, length of the extra run) for budget k on `grid`."""
    n = math.prod(grid)
    width = grid[-1]
    if k >= n:
        return width, n // width, 0
    rows = k // width
    extra = k - rows * width if (remainder == "run" or rows == 0) else 0
    return width, rows, extra


def row_selection(scores: torch.Tensor, grid: tuple[int, ...], k: int, remainder: str) -> torch.Tensor:
    """scores [I, N] over `grid` (raster order) -> [I, K] kept indices, increasing: the rows of
    highest summed score, plus (see `row_plan`) the best run of the leftover length among the
    other rows."""
    n_images, n = scores.shape
    width, rows, extra = row_plan(k, grid, remainder)
    significance = scores.double().view(n_images, n // width, width)
    row_sums = significance.sum(-1)  # [I, R]
    offsets = torch.arange(width, device=scores.device)
    parts = []
    if rows:
        # [I, rows], increasing; a stable sort in float64 sends ties to the lower row
        kept_rows = torch.sort(row_sums, dim=-1, descending=True, stable=True).indices[:, :rows].sort(-1).values
        parts.append((kept_rows.unsqueeze(-1) * width + offsets).flatten(1))
    if extra:
        windows = significance.unfold(-1, extra, 1).sum(-1)  # [I, R, w - extra + 1]
        if rows:
            taken = torch.zeros_like(row_sums, dtype=torch.bool).scatter_(1, kept_rows, True)
            windows = windows.masked_fill(taken.unsqueeze(-1), float("-inf"))
        best = windows.flatten(1).argmax(-1)  # the first maximum: lowest row, then leftmost start
        per_row = windows.shape[-1]
        start = (best // per_row) * width + best % per_row
        parts.append(start.unsqueeze(-1) + offsets[:extra])
    return torch.cat(parts, dim=1).sort(dim=1).values


@register_method
class FoPru(VisionMethod):
    name = "fopru"
    needs = frozenset({"cls_attention"})
    paper = "FoPru: Focal Pruning for Efficient Large Vision-Language Models (arXiv 2411.14164)"
    release = ("no official release; the authors' group's implementation: github dongxianzhe/hydrainfer "
               "@ d4d5f4f, hydrainfer/layer/token_prunning.py focal_prunning (wired at fb75c7a, "
               "dxz/model/llava.py image_embed)")
    options = {
        "strategy": Option("rank", choice("rank", "row"),
                           "'rank': the k most significant tokens (global view); 'row': the grid rows of "
                           "highest summed significance, kept whole (local view)"),
        "remainder": Option("drop", choice("drop", "run"),
                            "row strategy: 'drop' keeps whole rows only ((k // w) rows, <= k tokens; one run "
                            "of k when k < w); 'run' adds the best consecutive run of the leftover length in "
                            "a row not kept (exactly k)"),
        "layers": Option(None, optional_int_list,
                         "vision encoder layers (0-based, negative from the end) whose [CLS] rows are summed "
                         "(LLaVA); None = the layer that produces the LLM's features"),
    }

    def output_count(self, k, grid, options) -> int:
        n = math.prod(grid)
        if options["strategy"] == "rank" or k >= n:
            return min(k, n)
        width, rows, extra = row_plan(k, grid, options["remainder"])
        return rows * width + extra

    def reduce(self, features, grid, k, signals, options) -> Reduction:
        scores = signals["cls_attention"]
        if options["strategy"] == "rank" or k >= features.shape[1]:
            from vlm_prune.kernels import top_k_selection

            return Reduction.of(top_k_selection(features, scores, k))
        return gather_tokens(features, row_selection(scores, tuple(grid), k, options["remainder"]))
