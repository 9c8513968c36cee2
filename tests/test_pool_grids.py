"""`pool` on non-square grids: the output grid, the averaged and subsampled tokens and the
representative (kept) index, each against a reference computed another way (adaptive_avg_pool2d
on a grid built with its own reshape, explicit loops over the adaptive-pooling cells, tokens
that carry their own coordinates), through the method API and the public API on a tiny Qwen2-VL
whose images have non-square token grids. The existing pool tests used square grids only, where
swapping rows and columns goes unnoticed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlm_prune
from vlm_prune import tiny
from vlm_prune.config import tokens_to_keep
from vlm_prune.methods.pool import pooled_grid
from vlm_prune.registry import get_method

from .reference import reference_logits

# (h, w, k): non-square grids, wide and tall, a single row / column, odd budgets, budgets that
# are not a product of the grid's sides, and the whole grid
CASES = [(3, 5, 6), (5, 3, 6), (7, 4, 5), (4, 7, 9), (7, 4, 11), (1, 6, 3), (6, 1, 4), (9, 2, 7),
         (5, 8, 13), (3, 5, 15), (2, 9, 1), (11, 4, 10)]


def cells(size: int, n: int) -> list[tuple[int, int]]:
    """[start, end) of each adaptive-pooling cell along one axis: floor(i*size/n) to
    ceil((i+1)*size/n), written with math.floor / math.ceil on fractions (as torch defines it)."""
    return [(math.floor(i * size / n), math.ceil((i + 1) * size / n)) for i in range(n)]


def by_loops(features: torch.Tensor, h: int, w: int, rows: int, cols: int):
    """(cell means [I, rows*cols, D], centre tokens [rows*cols]) from explicit loops over the
    cells; the centre of [s, e) is the lower middle, (s + e - 1) // 2."""
    means, centres = [], []
    for rs, re in cells(h, rows):
        for cs, ce in cells(w, cols):
            members = [r * w + c for r in range(rs, re) for c in range(cs, ce)]
            means.append(features[:, members].double().mean(1))
            centres.append(((rs + re - 1) // 2) * w + (cs + ce - 1) // 2)
    return torch.stack(means, 1), centres


def reduce(features, grid, k, mode):
    return get_method("pool")().reduce(features, grid, k, {}, {"mode": mode})


def test_pooled_grid_by_hand_on_non_square_grids():
    """Guards the output grid's orientation and budget on wide and tall grids (r = round(sqrt(k*h/w)),
    c = k // r, then r = k // c, each clamped to the grid):
    3x5 k=6:  sqrt(3.6)=1.90 -> r=2, c=3, r=6//3=2          -> 2x3
    5x3 k=6:  sqrt(10)=3.16 -> r=3, c=2, r=3                -> 3x2
    7x4 k=5:  sqrt(8.75)=2.96 -> r=3, c=1, r=5              -> 5x1
    4x7 k=9:  sqrt(5.14)=2.27 -> r=2, c=4, r=2              -> 2x4
    7x4 k=11: sqrt(19.25)=4.39 -> r=4, c=2, r=5             -> 5x2
    1x6 k=3:  sqrt(0.5)=0.71 -> r=1, c=3, r=min(1, 3)=1     -> 1x3
    6x1 k=4:  sqrt(24)=4.90 -> r=5, c=min(1, 0->1)=1, r=4   -> 4x1 (5x1 would exceed the budget)
    9x2 k=7:  sqrt(31.5)=5.61 -> r=6, c=1, r=7              -> 7x1
    5x8 k=13: sqrt(8.125)=2.85 -> r=3, c=4, r=3             -> 3x4
    3x5 k=15: sqrt(9)=3 -> r=3, c=5, r=3                    -> 3x5 (the whole grid)
    2x9 k=1:  sqrt(0.22)=0.47 -> r=max(1, 0)=1, c=1, r=1    -> 1x1
    11x4 k=10: sqrt(27.5)=5.24 -> r=5, c=2, r=5             -> 5x2"""
    expected = [(2, 3), (3, 2), (5, 1), (2, 4), (5, 2), (1, 3), (4, 1), (7, 1), (3, 4), (3, 5), (1, 1), (5, 2)]
    assert [pooled_grid(k, h, w) for h, w, k in CASES] == expected


@pytest.mark.parametrize("h, w, k", CASES)
def test_avg_pool_equals_adaptive_avg_pool2d_and_cell_loops(h, w, k):
    """Guards `avg` on non-square grids: rows and columns swapped in the reshape to an image, or
    in the output's flattening, pass on square grids only. Reference 1: adaptive_avg_pool2d on
    the grid built as [I, h, w, D] -> [I, D, h, w] (another reshape than the method's);
    reference 2: explicit cell loops. The index is each cell's centre token."""
    torch.manual_seed(h * 100 + w * 10 + k)
    n_images, dim = 2, 3
    features = torch.randn(n_images, h * w, dim)
    rows, cols = pooled_grid(k, h, w)
    red = reduce(features, (h, w), k, "avg")
    image = features.view(n_images, h, w, dim).permute(0, 3, 1, 2)
    expected = F.adaptive_avg_pool2d(image, (rows, cols)).permute(0, 2, 3, 1).reshape(n_images, rows * cols, dim)
    torch.testing.assert_close(red.features, expected)
    means, centres = by_loops(features, h, w, rows, cols)
    torch.testing.assert_close(red.features.double(), means)
    assert red.index.tolist() == [centres] * n_images
    assert red.features.shape == (n_images, rows * cols, dim) and rows * cols <= k


@pytest.mark.parametrize("h, w, k", CASES)
def test_subsample_takes_each_cell_centre(h, w, k):
    """Guards `subsample` (and the representative index both modes share) on non-square grids:
    the centre row of a cell times w plus its centre column, from explicit cell loops."""
    torch.manual_seed(k)
    features = torch.randn(3, h * w, 5)
    rows, cols = pooled_grid(k, h, w)
    red = reduce(features, (h, w), k, "subsample")
    _, centres = by_loops(features, h, w, rows, cols)
    assert red.index.tolist() == [centres] * 3
    assert torch.equal(red.features, features[:, centres])


@pytest.mark.parametrize("h, w, k", [(3, 5, 6), (7, 4, 11), (6, 1, 4), (2, 9, 5)])
def test_pooled_tokens_sit_at_their_cells(h, w, k):
    """Guards the geometry with tokens that carry their own coordinates (feature = (row, col)):
    each averaged token is the mean coordinate of its cell, i.e. the midpoint of its row span
    and of its column span; output j is cell divmod(j, cols); its index lies inside the cell."""
    coords = torch.tensor([[r, c] for r in range(h) for c in range(w)], dtype=torch.float64)[None]
    rows, cols = pooled_grid(k, h, w)
    red = reduce(coords, (h, w), k, "avg")
    row_cells, col_cells = cells(h, rows), cells(w, cols)
    for j in range(rows * cols):
        (rs, re), (cs, ce) = row_cells[j // cols], col_cells[j % cols]
        assert red.features[0, j].tolist() == pytest.approx([(rs + re - 1) / 2, (cs + ce - 1) / 2])
        r, c = divmod(int(red.index[0, j]), w)
        assert rs <= r < re and cs <= c < ce


@pytest.mark.parametrize("h, w, k", CASES)
def test_output_count_is_what_reduce_returns(h, w, k):
    """Guards what vLLM reserves before the image is seen: `output_count` on a non-square grid
    equals the count `reduce` returns, in both modes."""
    method = get_method("pool")()
    features = torch.randn(1, h * w, 2)
    for mode in ("avg", "subsample"):
        assert method.output_count(k, (h, w), {"mode": mode}) == reduce(features, (h, w), k, mode).index.shape[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_avg_pool_keeps_the_dtype_and_averages_in_float(dtype):
    """Guards the half-precision path: the output has the input's dtype and equals the float
    average rounded once (not an average accumulated in half precision)."""
    torch.manual_seed(0)
    features = (torch.randn(2, 7 * 4, 6) * 50).to(dtype)
    red = reduce(features, (7, 4), 11, "avg")
    means, _ = by_loops(features, 7, 4, *pooled_grid(11, 7, 4))
    assert red.features.dtype == dtype
    torch.testing.assert_close(red.features, means.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["avg", "subsample"])
def test_engine_pools_transposed_grids_of_one_batch_each_on_its_own_grid(mode):
    """Guards the engine's batching (`reduce_images` groups regions by grid and budget): a 3x5
    and a 5x3 image have as many tokens and the same budget but must not share a group (nor a
    grid); each passes on its own cells' centres and means (cell loops)."""
    from vlm_prune.config import PruneConfig
    from vlm_prune.patches.image_tokens import ImageTokens, Region, reduce_images

    torch.manual_seed(1)
    grids = [(3, 5), (5, 3), (3, 5)]
    images = [ImageTokens(torch.randn(15, 4), [Region.span(0, 15, grid)]) for grid in grids]
    kept, out = reduce_images(get_method("pool")(), PruneConfig("pool", 6, options={"mode": mode}), images)
    for (h, w), image, keep, features in zip(grids, images, kept, out):
        means, centres = by_loops(image.features[None], h, w, *pooled_grid(6, h, w))
        assert keep.nonzero().flatten().tolist() == centres
        expected = means[0].float() if mode == "avg" else image.features[centres]
        torch.testing.assert_close(features, expected)


# -- the public API on non-square Qwen2-VL images ----------------------------------------------


@pytest.fixture(scope="module")
def qwen():
    return tiny.qwen2_vl(version="2", vision_depth=1, text_layers=1, text_hidden=32)


@pytest.mark.parametrize("mode", ["avg", "subsample"])
def test_pool_on_qwen_non_square_images_equals_the_reference(qwen, mode):
    """Guards the grid the Qwen patch hands to `pool` (rows = h // 2, cols = w // 2 merged tokens)
    and the pooled features and positions: one prompt with a 3x5 and a 7x3 image (140x84 and
    84x196 px), keep=0.4 -> 6 and 8 tokens; the kept index is each cell's centre (cell loops),
    the tokens are the cell means (avg) or centres (subsample) of the unpruned merged features,
    and the logits equal the unpatched language model run on them at the centres' M-RoPE
    positions."""
    from .test_families import image_features, make_inputs, unpruned_positions

    model, processor = qwen
    inputs = make_inputs(processor, "qwen2_vl", [(140, 84), (84, 196)], ["Which is wider?"], per_row=[2])
    grids = [(h // 2, w // 2) for _, h, w in inputs["image_grid_thw"].tolist()]
    assert grids == [(3, 5), (7, 3)]
    feats = image_features(model, inputs)
    kept_features, kept_index = [], []
    for (h, w), f in zip(grids, feats):
        k = tokens_to_keep(0.4, h * w)
        means, centres = by_loops(f[None], h, w, *pooled_grid(k, h, w))
        kept_index.append(centres)
        kept_features.append(means[0].to(f.dtype) if mode == "avg" else f[centres])
    with vlm_prune.pruned(model, "pool", 0.4, mode=mode) as handle, torch.no_grad():
        out = model(**inputs).logits[0]
        assert [i.tolist() for i in handle.kept_indices] == kept_index
    expected = reference_logits(model, inputs["input_ids"][0], kept_features, kept_index, "original",
                                unpruned_positions(model, inputs))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
