"""Gaps found by planting bugs in the model-free pieces (budget arithmetic, the engine's
contract check and batching, divprune, the M-RoPE index): each test here fails under a planted
bug that the rest of the suite let through (divprune's: caught only end to end, by a LLaVA-NeXT
contract test). References are computed another way (exact fractions, plain loops, numbering
by hand) rather than hard-coded, unless derived in a comment."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from vlm_prune.config import PruneConfig, split_budget, tokens_to_keep
from vlm_prune.methods.base import Reduction
from vlm_prune.methods.divprune import max_min_diverse
from vlm_prune.patches.image_tokens import ImageTokens, Region, reduce_images, region_budgets

# -- budget arithmetic ---------------------------------------------------------------------------


def largest_remainder(total: int, sizes: list[int]) -> list[int]:
    """split_budget's documented rule in exact fractions: floor of each proportional share, the
    rest one each to the largest remainders (equal remainders: the earlier region), capped."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    exact = [Fraction(max(total, 0) * n, whole) for n in sizes]
    shares = [math.floor(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (shares[i] - exact[i], i))
    for i in order[:max(total, 0) - sum(shares)]:
        shares[i] += 1
    return [min(s, n) for s, n in zip(shares, sizes)]


def test_split_budget_gives_the_rest_to_the_largest_remainders():
    """Guards the largest-remainder rule (a planted smallest-remainder-first passed the suite):
    5 over [1, 2, 4]: exact 5/7, 10/7, 20/7 = 0.71, 1.43, 2.86 -> floors 0, 1, 2 (3), the 2
    left go to the remainders .86 and .71 -> [1, 1, 3]."""
    assert split_budget(5, [1, 2, 4]) == [1, 1, 3]


def test_split_budget_breaks_exact_ties_by_region_order():
    """Guards "ties go to the earlier region" when the tie is exact but the float shares differ in
    their last bit (it went to whichever share rounded up): 3 over [1, 1, 7]: exact 1/3, 1/3,
    7/3 -> floors 0, 0, 2, three equal remainders 1/3 -> the one left goes to region 0 ->
    [1, 0, 2]. Then every split of small and LLaVA-NeXT-like sizes against exact fractions."""
    assert split_budget(3, [1, 1, 7]) == [1, 0, 2]
    cases = [(t, list(s)) for s in itertools.product(range(0, 9), repeat=3) for t in range(sum(s) + 2)]
    cases += [(t, [576, 1728, 1152]) for t in range(0, 3457, 7)] + [(1360, [436, 1589, 338])]
    for total, sizes in cases:
        assert split_budget(total, sizes) == largest_remainder(total, sizes), (total, sizes)


def test_tokens_to_keep_rounds_halves_up():
    """Guards the float budget's rounding (round-half-even or floor passed the suite): against
    floor(keep * n + 1/2) in exact fractions, for keeps exact in binary (j / 64), so halves
    occur (0.5 * 9 = 4.5 -> 5; 0.375 * 4 = 1.5 -> 2), clamped to [1, n]."""
    assert tokens_to_keep(0.5, 9) == 5 and tokens_to_keep(0.375, 4) == 2
    for j in range(1, 65):
        for n in range(1, 200):
            expected = min(n, max(1, math.floor(Fraction(j, 64) * n + Fraction(1, 2))))
            assert tokens_to_keep(j / 64, n) == expected, (j, n)


def test_region_budgets_split_the_image_budget_or_give_each_region_its_own():
    """Guards the two budget policies on an image of two regions (9 and 15 tokens), keep=0.3:
    per_image: round(0.3 * 24) = round(7.2) = 7 split over [9, 15] (exact 2.625, 4.375 -> 2, 4,
    the one left to .625) -> [3, 4]; per_crop: round(0.3 * 9) = round(2.7) = 3 and
    round(0.3 * 15) = round(4.5) = 5 (half up) -> [3, 5]. Summing per-region budgets under
    per_image (8 tokens) passed the suite."""
    regions = [Region.span(0, 9, (3, 3)), Region.span(9, 24, (3, 5))]
    config = PruneConfig("random", 0.3)
    assert region_budgets(config, regions, "per_image") == [3, 4]
    assert region_budgets(config, regions, "per_crop") == [3, 5]


# -- the engine ------------------------------------------------------------------------------------


class FixedIndex:
    """A third-party method that returns the index it is given (first k of it) for every image."""

    needs, uses_pre_projection = frozenset(), False

    def __init__(self, index):
        self.index = index

    def reduce(self, features, grid, k, signals, options):
        index = torch.tensor(self.index[:k]).expand(features.shape[0], -1)
        return Reduction(features=features.gather(1, index[..., None].expand(-1, -1, features.shape[-1])), index=index)


def test_reduce_images_rejects_repeated_indices():
    """Guards the engine's contract check for third-party methods: a repeated index (one token
    passed on twice) is refused as well as a decreasing one; a check that allowed repeats
    (>= instead of >) passed the suite, which only tried a reversed index."""
    images = [ImageTokens(torch.randn(9, 2), [Region.span(0, 9, (3, 3))])]
    config = PruneConfig("random", 3)
    kept, out = reduce_images(FixedIndex([0, 4, 8]), config, images)
    assert kept[0].nonzero().flatten().tolist() == [0, 4, 8] and out[0].shape == (3, 2)
    with pytest.raises(RuntimeError, match="unsorted or repeated"):
        reduce_images(FixedIndex([0, 4, 4]), config, images)


# -- divprune --------------------------------------------------------------------------------------


def test_divprune_never_picks_a_token_twice_among_duplicates():
    """Guards the exclusion of kept tokens: with fewer distinct tokens than the budget (a flat
    image region), every remaining distance to the kept set is 0 and, without the exclusion, the
    argmax picked an already kept token again. One-hot directions make every distance exactly 0
    or 1, so the greedy plain loop (ties to the lowest index) is an exact reference: 3 distinct
    tokens repeated over 10, k = 6, for two images."""
    pattern = [[0, 1, 0, 2, 1, 0, 2, 2, 1, 0], [2, 2, 1, 0, 0, 1, 2, 0, 1, 1]]
    feats = torch.eye(3)[torch.tensor(pattern)]  # [2, 10, 3]
    picked = max_min_diverse(feats, 6)
    for image in range(2):
        dist = 1 - feats[image] @ feats[image].T
        n = dist.shape[0]
        first = max(range(n), key=lambda i: min(float(dist[i, j]) for j in range(n) if j != i))
        chosen = [first]
        while len(chosen) < 6:
            rest = [i for i in range(n) if i not in chosen]
            chosen.append(max(rest, key=lambda i: min(float(dist[i, c]) for c in chosen)))
        assert picked[image].tolist() == sorted(chosen)
        assert len(set(picked[image].tolist())) == 6


def test_stacking_never_views_tensors_of_other_strides_as_one_batch():
    """Guards `_stack`'s batch view (`_as_batch_view`): two [9, 3] tensors equally spaced in one
    storage but laid out differently (row-major and a transposed view) must be copied, not read
    through the first one's strides; a view check that skipped the strides passed the suite."""
    from vlm_prune.patches.image_tokens import _stack

    storage = torch.randn(60)
    row_major = storage[0:27].view(9, 3)
    column_major = storage[27:54].view(3, 9).t()  # [9, 3] with strides (1, 9)
    whole = Region.span(0, 9, (3, 3))
    stacked = _stack([(row_major, whole), (column_major, whole)])
    assert torch.equal(stacked, torch.stack([row_major, column_major]))


# -- M-RoPE ----------------------------------------------------------------------------------------


def test_image_rope_index_by_hand():
    """Guards the vectorised M-RoPE numbering with one worked example instead of the model's own
    function (and `pad_value`, which the model comparison never reads: it looks at valid tokens
    only). merge 2; grids (t, h, w) in prompt order: [1, 4, 6] -> 2x3 tokens, [1, 4, 6], [1, 2, 4]
    -> 1x2 tokens. Row 0: pad, text, text, image (2x3), text, text. Row 1: text, image (2x3),
    text, image (1x2), text. Text counts on by one; an image starting at s numbers its token
    (hi, wi) as (s, s + hi, s + wi); text after it resumes at s + max(h, w).
    Row 0: pad=-5 | 0 1 | image at s=2: t 2 2 2 2 2 2, h 2 2 2 3 3 3, w 2 3 4 2 3 4 | 2+3 = 5, 6.
    Row 1: 0 | image at s=1: t 1.., h 1 1 1 2 2 2, w 1 2 3 1 2 3 | 1+3 = 4 | image at s=5: t 5 5,
    h 5 5, w 5 6 | 5+2 = 7. Deltas: max + 1 - valid tokens = 6 + 1 - 10 = -3 and 7 + 1 - 11 = -3."""
    from vlm_prune.patches.mrope import image_rope_index

    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0]])
    mask = torch.tensor([[0] + [1] * 10, [1] * 11])
    positions, deltas = image_rope_index(types, mask, [[1, 4, 6], [1, 4, 6], [1, 2, 4]], 2, pad_value=-5)
    expected = torch.tensor([
        [[-5, 0, 1, 2, 2, 2, 2, 2, 2, 5, 6], [0, 1, 1, 1, 1, 1, 1, 4, 5, 5, 7]],  # t
        [[-5, 0, 1, 2, 2, 2, 3, 3, 3, 5, 6], [0, 1, 1, 1, 2, 2, 2, 4, 5, 5, 7]],  # h
        [[-5, 0, 1, 2, 3, 4, 2, 3, 4, 5, 6], [0, 1, 2, 3, 1, 2, 3, 4, 5, 6, 7]],  # w
    ])
    assert torch.equal(positions, expected)
    assert deltas.tolist() == [[-3], [-3]]
