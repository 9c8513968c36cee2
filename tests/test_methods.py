"""The methods and the sequence compaction on small tensors, checked against hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlm_prune.methods.base import keep_top_k
from vlm_prune.methods.pool import Pool, cell_centres, pooled_grid
from vlm_prune.methods.random_select import RandomSelect
from vlm_prune.sequence import Compaction


def test_top_k_keeps_raster_order_and_breaks_ties_by_index():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.2], [5.0, 1.0, 1.0, 1.0, 0.0]])
    assert keep_top_k(scores, 3).tolist() == [[1, 2, 3], [0, 1, 2]]
    assert keep_top_k(scores, 5).tolist() == [[0, 1, 2, 3, 4]] * 2


def test_pooled_grid_stays_within_budget_and_aspect():
    assert pooled_grid(64, 24, 24) == (8, 8)
    assert pooled_grid(144, 24, 24) == (12, 12)
    assert pooled_grid(50, 24, 24) == (7, 7)
    assert pooled_grid(1, 24, 24) == (1, 1)
    assert pooled_grid(24, 12, 24) == (3, 8)  # wide grid -> wide output
    for k in range(1, 80):
        rows, cols = pooled_grid(k, 7, 9)
        assert 1 <= rows <= 7 and 1 <= cols <= 9 and rows * cols <= max(k, 1)


def test_cell_centres_are_increasing_and_inside_cells():
    for size in (5, 8, 24, 27):
        for cells in range(1, size + 1):
            centres = cell_centres(size, cells)
            assert (centres[1:] > centres[:-1]).all()
            assert centres.min() >= 0 and centres.max() < size


def test_avg_pool_equals_block_means_on_a_divisible_grid():
    torch.manual_seed(0)
    feats = torch.randn(2, 64, 5)  # two 8x8 images
    red = Pool().reduce(feats, (8, 8), 16, {}, {"mode": "avg"})
    grid = feats.transpose(1, 2).reshape(2, 5, 8, 8)
    expected = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(red.features, expected)
    # centre of block (r, c) is (2r, 2c) for 2x2 blocks (lower-left of the two middle rows)
    assert red.index[0].tolist() == [16 * r + 2 * c for r in range(4) for c in range(4)]


def test_subsample_takes_the_centre_tokens():
    feats = torch.arange(2 * 36, dtype=torch.float32).view(1, 36, 2)
    red = Pool().reduce(feats, (6, 6), 9, {}, {"mode": "subsample"})
    # 6x6 -> 3x3 cells of 2x2; the centre of a 2-wide cell is its first token
    assert red.index.tolist() == [[0, 2, 4, 12, 14, 16, 24, 26, 28]]
    torch.testing.assert_close(red.features, feats[0, red.index[0]].unsqueeze(0))


def test_random_is_seeded_and_batch_independent():
    feats = torch.randn(3, 50, 4)
    a = RandomSelect().reduce(feats, (5, 10), 7, {}, {"seed": 1})
    b = RandomSelect().reduce(feats[1:2], (5, 10), 7, {}, {"seed": 1})
    c = RandomSelect().reduce(feats, (5, 10), 7, {}, {"seed": 2})
    assert a.index.shape == (3, 7) and torch.equal(a.index[1], b.index[0])
    assert (a.index[:, 1:] > a.index[:, :-1]).all()
    assert not torch.equal(a.index, c.index)


def test_compaction_left_pads_rows_that_keep_fewer_tokens():
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    comp = Compaction.from_keep_mask(keep, left_padded=True)
    assert comp.index.tolist() == [[-1, -1, 0, 2, 3, 5], [0, 1, 2, 3, 4, 5]]
    assert comp.dropped_before.tolist() == [[0, 0, 0, 1, 1, 2], [0] * 6]
    ids = torch.arange(12).view(2, 6) + 10
    assert comp.gather(ids, pad_value=-7).tolist() == [[-7, -7, 10, 12, 13, 15], list(range(16, 22))]
    # two generated tokens appended: they are kept and shifted by the row's whole drop count
    longer = torch.arange(16).view(2, 8)
    assert comp.gather(longer, 0).tolist()[0] == [0, 0, 0, 2, 3, 5, 6, 7]
    assert comp.renumber(comp.gather(longer, 0)).tolist()[0] == [0, 0, 0, 1, 2, 3, 4, 5]


def test_compaction_followed_by_another_is_one_compaction_of_the_whole():
    """A cached turn (row 0 kept 4 of 6, re-padded on the left) + 1 generated token, then a
    new turn whose rows keep 3 and 2 of 4: the pad of row 1's new turn sits mid-sequence."""
    first = Compaction.from_keep_mask(torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool))
    segment = Compaction.from_keep_mask(torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]], dtype=torch.bool))
    whole = first.followed_by(7, segment)
    assert whole.prompt_len == 11 and whole.kept_per_row == (8, 9)
    assert whole.index.tolist() == [[-1, -1, 0, 2, 3, 5, 6, 7, 8, 10], [0, 1, 2, 3, 4, 5, 6, -1, 8, 9]]
    assert whole.dropped_before.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3], [0] * 7 + [0, 1, 1]]
    assert whole.total_dropped.tolist() == [3, 2]
    ids = torch.arange(24).view(2, 12) + 100  # one token generated after the new turn
    assert whole.gather(ids, -7).tolist() == [[-7, -7, 100, 102, 103, 105, 106, 107, 108, 110, 111],
                                              [112, 113, 114, 115, 116, 117, 118, -7, 120, 121, 123]]
    # equal counts per row but a pad mid-row still needs a mask
    even = Compaction.from_keep_mask(torch.tensor([[1, 1, 1], [0, 1, 1]], dtype=torch.bool)).followed_by(
        3, Compaction.from_keep_mask(torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)))
    assert even.kept_per_row == (5, 5) and even.index.tolist() == [[0, 1, 2, -1, 3, 4], [-1, 1, 2, 3, 4, 5]]
    assert even.needs_mask and even.gather(torch.ones(2, 6), 0)[:, [0, 3]].tolist() == [[1, 0], [0, 1]]


def test_compaction_right_padding_and_3d_positions():
    keep = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    comp = Compaction.from_keep_mask(keep, left_padded=False)
    assert comp.index.tolist() == [[0, 1, 3, -1], [0, 1, 2, 3]]
    pos = torch.arange(4).expand(3, 2, 4)  # M-RoPE style [3, B, L]
    out = comp.gather(pos, 0)
    assert out.shape == (3, 2, 4) and out[:, 0].tolist() == [[0, 1, 3, 0]] * 3
    embeds = torch.randn(2, 4, 3)
    torch.testing.assert_close(comp.gather(embeds, 0, seq_dim=1)[0, :3], embeds[0, [0, 1, 3]])


def test_reduce_images_rejects_unsorted_indices_and_checks_every_group():
    """The engine's contract check (one device read for all groups): a method whose indices are
    not strictly increasing is refused, also when only the second of two groups breaks it."""
    from vlm_prune.config import PruneConfig
    from vlm_prune.methods.base import Reduction
    from vlm_prune.patches.image_tokens import ImageTokens, Region, reduce_images

    class Reversed:
        needs, uses_pre_projection = frozenset(), False

        def __init__(self, bad_grid):
            self.bad_grid = bad_grid

        def reduce(self, features, grid, k, signals, options):
            index = torch.arange(k).expand(features.shape[0], k)
            if grid == self.bad_grid:
                index = index.flip(-1)
            return Reduction(features=features[:, :k], index=index)

    images = [ImageTokens(torch.randn(4, 3), [Region(torch.arange(4), (2, 2))]),
              ImageTokens(torch.randn(9, 3), [Region(torch.arange(9), (3, 3))])]
    config = PruneConfig("random", 0.5)
    kept, out = reduce_images(Reversed(bad_grid=None), config, images)
    budgets = [config.budget_for(4), config.budget_for(9)]
    assert [int(k.sum()) for k in kept] == budgets and [o.shape[0] for o in out] == budgets
    for bad in [(2, 2), (3, 3)]:
        with pytest.raises(RuntimeError, match="unsorted or repeated"):
            reduce_images(Reversed(bad_grid=bad), config, images)


def test_images_of_one_batch_are_stacked_as_a_view():
    """The engine batches images whose tokens are equally spaced rows of one tensor (a tower's
    [I, N, D] output, also past a [CLS] column) as a view of it; anything else is copied."""
    from vlm_prune.patches.image_tokens import Region, _stack

    tower = torch.randn(4, 10, 3)
    whole = Region.span(0, 9, (3, 3))
    for rows in (tower[:, 1:], tower[:, :9], tower[:, 1:, 0]):
        parts = [(rows[i], whole) for i in range(4)]
        stacked = _stack(parts)
        assert torch.equal(stacked, torch.stack([rows[i] for i in range(4)]))
        assert stacked.untyped_storage().data_ptr() == tower.untyped_storage().data_ptr()
    for images in ([tower[0, 1:], tower[2, 1:], tower[1, 1:]],  # out of order
                   [tower[0, 1:], torch.randn(9, 3)],  # different storage
                   [tower[0, 1:], tower[1, :9], tower[2, 1:]]):  # unequal spacing
        stacked = _stack([(x, whole) for x in images])
        assert torch.equal(stacked, torch.stack(images))
        assert stacked.untyped_storage().data_ptr() != tower.untyped_storage().data_ptr()


def test_images_that_follow_one_another_are_one_view():
    """Whole images reduced in place: their tokens must lie one after another in one tensor
    (Qwen's merged tower output split per image; LLaVA's [I, N, D] rows); otherwise None."""
    from vlm_prune.patches.image_tokens import _consecutive

    tower = torch.randn(20, 4)
    parts = list(tower.split([6, 9, 5]))
    joined = _consecutive(parts)
    assert torch.equal(joined, tower) and joined.data_ptr() == tower.data_ptr()
    assert _consecutive([tower[:6], tower[7:12]]) is None  # a gap
    assert _consecutive([tower[6:9], tower[:6]]) is None  # out of order
    assert _consecutive([tower[:6], torch.randn(3, 4)]) is None  # another tensor
    assert _consecutive([tower[:6, :2], tower[6:9, :2]]) is None  # strided rows
