"""`fopru` follows FoPru's rules (arXiv 2411.14164; the authors' group's implementation
github dongxianzhe/hydrainfer @ d4d5f4f, hydrainfer/layer/token_prunning.py), checked against a
reference written here from the rules with plain loops and none of vlm_prune's code:

- rank: the k most significant tokens (ties to the lower index), in raster order;
- row: the grid's rows ranked by summed significance (ties to the lower row), the k // w best
  kept whole; leftover k - (k // w) w tokens (remainder="run", or always when k < w) as the
  consecutive run of highest sum in a row not kept (first maximum in raster order);
- the kept tokens in raster order.

Mutated rules (no reorder, mean instead of sum over a row... ) must give other tokens, so the
parity is not vacuous. End to end on tiny LLaVA / Qwen2-VL: the kept tokens are the rule's on the
family's significance ([CLS] row by hand on LLaVA, attention received by hand on Qwen), keep=1.0
is the identity, keep < 1 changes the output, generate with a cache equals without.
"""

from __future__ import annotations

import math

import pytest
import torch

import vlm_prune
import vlm_prune.methods.fopru  # noqa: F401  (registers "fopru")
from vlm_prune import tiny
from vlm_prune.methods.fopru import FoPru

from .reference import eager_cls_scores, image_features, reference_logits
from .test_families import _qwen_attention_received, greedy, logits, make_inputs, unpruned_positions

GRIDS = [(5, 7), (7, 5), (24, 24), (1, 9), (9, 1), (3, 4, 6)]
SEEDS = [0, 1, 2, 3]


# -- the reference: the rules with loops ---------------------------------------------------------


def ref_rank(scores: list[float], k: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def ref_row(scores: list[float], grid: tuple[int, ...], k: int, remainder: str = "drop",
            mutation: str | None = None) -> list[int]:
    n = math.prod(grid)
    if k >= n:
        return list(range(n))
    width = grid[-1]
    n_rows = n // width
    rows = [[scores[r * width + c] for c in range(width)] for r in range(n_rows)]
    if mutation == "columns":  # whole columns instead of whole rows
        width, n_rows = n_rows, width
        rows = [[scores[r * n_rows + c] for r in range(width)] for c in range(n_rows)]
    sums = []
    for r in range(n_rows):
        total = 0.0
        for value in rows[r]:
            total += value
        sums.append(max(rows[r]) if mutation == "max" else total)
    order = sorted(range(n_rows), key=lambda r: (-sums[r], r))
    if mutation == "ascending":
        order = order[::-1]
    whole = k // width
    if mutation == "ceil":
        whole = -(-k // width)
    kept_rows = order[:whole]
    if mutation == "columns":
        kept = [r * n_rows + c for c in kept_rows for r in range(width)]
    else:
        kept = [r * width + c for r in kept_rows for c in range(width)]
    extra = k - whole * width if (remainder == "run" or whole == 0) else 0
    if extra > 0 and mutation != "columns":
        best, best_at = None, None
        for r in range(n_rows):
            if r in kept_rows and mutation != "run_anywhere":
                continue
            for start in range(width - extra + 1):
                total = 0.0
                for c in range(start, start + extra):
                    total += rows[r][c]
                if mutation == "run_last" and best is not None and total == best:
                    best_at = (r, start)
                if best is None or total > best:
                    best, best_at = total, (r, start)
        r, start = best_at
        kept += [r * width + c for c in range(start, start + extra)]
    if mutation == "no_reorder":
        return kept
    return sorted(kept)


def run_method(scores: torch.Tensor, grid, k, **options):
    method = FoPru()
    opts = method.validate_options(options)
    features = torch.randn(scores.shape[0], scores.shape[1], 3)
    reduction = method.reduce(features, grid, k, {"cls_attention": scores}, opts)
    index = reduction.index
    assert torch.equal(reduction.features, features.gather(1, index.unsqueeze(-1).expand(-1, -1, 3)))
    assert index.shape[1] == method.output_count(k, grid, opts)
    return index.tolist()


def budgets(grid):
    n = math.prod(grid)
    return sorted({1, 2, grid[-1] - 1, grid[-1], grid[-1] + 1, n // 3, n // 2, n - 1, n} - {0})


# -- parity with the rules ---------------------------------------------------------------------


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_rank_equals_the_rules(grid, seed):
    n = math.prod(grid)
    scores = torch.rand(2, n, generator=torch.Generator().manual_seed(seed))
    for k in budgets(grid):
        got = run_method(scores, grid, k, strategy="rank")
        assert got == [ref_rank(row.tolist(), k) for row in scores]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("remainder", ["drop", "run"])
def test_row_equals_the_rules(grid, seed, remainder):
    n = math.prod(grid)
    scores = torch.rand(3, n, generator=torch.Generator().manual_seed(100 + seed)).double()
    for k in budgets(grid):
        got = run_method(scores, grid, k, strategy="row", remainder=remainder)
        assert got == [ref_row(row.tolist(), grid, k, remainder) for row in scores], k


@pytest.mark.parametrize("strategy", ["rank", "row"])
@pytest.mark.parametrize("remainder", ["drop", "run"])
def test_ties_go_to_the_lower_index(strategy, remainder):
    """Integer scores (exact sums): many equal tokens, rows and runs."""
    grid = (6, 5)
    for seed in SEEDS:
        scores = torch.randint(0, 3, (2, 30), generator=torch.Generator().manual_seed(seed)).float()
        for k in budgets(grid):
            got = run_method(scores, grid, k, strategy=strategy, remainder=remainder)
            rows = scores.double().tolist()
            want = [ref_rank(r, k) if strategy == "rank" else ref_row(r, grid, k, remainder) for r in rows]
            assert got == want, (seed, k)


@pytest.mark.parametrize("mutation", ["columns", "max", "ascending", "ceil", "run_anywhere", "run_last",
                                      "no_reorder"])
def test_mutated_rules_differ(mutation):
    """Each mutated rule gives other tokens than the method on some case, so the parity above
    pins each rule down."""
    remainder = "run"
    differs = False
    for grid in [(5, 7), (6, 5), (24, 24)]:
        n = math.prod(grid)
        for seed in SEEDS:
            gen = torch.Generator().manual_seed(seed)
            scores = (torch.randint(0, 3, (1, n), generator=gen).float() if mutation == "run_last"
                      else torch.rand(1, n, generator=gen).double())
            for k in budgets(grid):
                if k >= n:
                    continue
                got = run_method(scores, grid, k, strategy="row", remainder=remainder)[0]
                mutated = ref_row(scores[0].double().tolist(), grid, k, remainder, mutation=mutation)
                differs |= got != mutated
    assert differs


def test_rank_mutations_differ():
    scores = torch.rand(1, 35, generator=torch.Generator().manual_seed(0))
    got = run_method(scores, (5, 7), 9, strategy="rank")[0]
    assert got != sorted(scores[0].argsort()[:9].tolist())  # lowest instead of highest
    assert got != scores[0].argsort(descending=True)[:9].tolist()  # significance order, not raster


def test_output_count_is_known_up_front():
    method = FoPru()
    for grid in GRIDS:
        n = math.prod(grid)
        for strategy in ["rank", "row"]:
            for remainder in ["drop", "run"]:
                opts = method.validate_options({"strategy": strategy, "remainder": remainder})
                for k in range(1, n + 3):
                    count = method.output_count(k, grid, opts)
                    assert 1 <= count <= min(k, n)
                    if strategy == "rank" or remainder == "run" or k < grid[-1] or k >= n:
                        assert count == min(k, n)
                    else:
                        assert count == (k // grid[-1]) * grid[-1]


def test_options_are_validated():
    with pytest.raises(ValueError, match="strategy='col' is not allowed"):
        FoPru.validate_options({"strategy": "col"})
    with pytest.raises(ValueError, match="unknown option"):
        FoPru.validate_options({"rows": 3})
    assert FoPru.validate_options({}) == {"strategy": "rank", "remainder": "drop", "layers": None}


# -- end to end on tiny models -----------------------------------------------------------------


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny.llava(seed=3)
    yield model, processor
    vlm_prune.unpatch(model)


@pytest.fixture(scope="module")
def qwen():
    model, processor = tiny.qwen2_vl(seed=4)
    yield model, processor
    vlm_prune.unpatch(model)


def llava_inputs(processor):
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    return processor(images=[tiny.random_image(150, 110, seed=4)], text=[prompt], return_tensors="pt")


OPTIONS = [{"strategy": "rank"}, {"strategy": "row"}, {"strategy": "row", "remainder": "run"}]


def expected_kept(scores: torch.Tensor, grid, k, options) -> list[int]:
    scores = scores.double().tolist()
    if options.get("strategy", "rank") == "rank":
        return ref_rank(scores, k)
    return ref_row(scores, grid, k, options.get("remainder", "drop"))


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_llava_keeps_the_rules_tokens(llava, options, positions):
    """LLaVA: significance = the feature layer's [CLS] row (heads averaged), by hand from an eager
    copy of the tower; the LLM sees exactly the kept tokens."""
    model, processor = llava
    inputs = llava_inputs(processor)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    n_layers = model.config.vision_config.num_hidden_layers
    produced_by = model.config.vision_feature_layer % (n_layers + 1) - 1
    scores = eager_cls_scores(model, inputs["pixel_values"], [produced_by])[0]
    k = 19  # 8 x 8 grid: 2 whole rows (+ a run of 3 with remainder="run")
    kept = expected_kept(scores, (side, side), k, options)
    feats = image_features(model, inputs["pixel_values"])[0][kept]
    expected = reference_logits(model, inputs["input_ids"][0], [feats], [kept], positions)
    handle = vlm_prune.patch(model, "fopru", k, positions=positions, **options)
    try:
        out = logits(model, inputs)[0]
        assert handle.kept_indices[0].tolist() == kept
        assert handle.stats == [{"visual_tokens": side * side, "kept": len(kept)}]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()


@pytest.mark.parametrize("options", OPTIONS)
def test_qwen_keeps_the_rules_tokens(qwen, options):
    """Qwen2-VL: significance = attention received in the last block (FoPru's own score), by hand;
    a non-square 7 x 10 grid; kept tokens at their original M-RoPE positions."""
    model, processor = qwen
    inputs = make_inputs(processor, "qwen2_vl", [(280, 196)], ["What is it?"])
    _, h, w = inputs["image_grid_thw"][0].tolist()
    grid = (h // 2, w // 2)
    scores = _qwen_attention_received(model, inputs)
    k = 24  # rows of 10: 2 whole rows (+ a run of 4 with remainder="run")
    kept = expected_kept(scores, grid, k, options)
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                         return_dict=True).pooler_output[0][kept]
    expected = reference_logits(model, inputs["input_ids"][0], [feats], [kept], "original",
                                unpruned_positions(model, inputs))
    handle = vlm_prune.patch(model, "fopru", k, **options)
    try:
        out = logits(model, inputs)[0]
        assert handle.kept_indices[0].tolist() == kept
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()


def _two_prompts(name, processor):
    if name == "llava":
        images = [tiny.random_image(64, 48, seed=0), tiny.random_image(48, 64, seed=1)]
        texts = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nHow many shapes are there? ASSISTANT:"]
        return processor(images=images, text=texts, return_tensors="pt", padding=True)
    return make_inputs(processor, "qwen2_vl", [(280, 196), (100, 300)], ["What is it?", "How many shapes?"])


@pytest.mark.parametrize("name", ["llava", "qwen"])
@pytest.mark.parametrize("options", OPTIONS)
def test_keep_all_identity_pruning_changes_output_cache_equals_no_cache(request, name, options):
    model, processor = request.getfixturevalue(name)
    inputs = _two_prompts(name, processor)
    expected = logits(model, inputs)
    handle = vlm_prune.patch(model, "fopru", 1.0, **options)
    try:
        assert torch.equal(logits(model, inputs), expected)
        assert all(s["kept"] == s["visual_tokens"] for s in handle.stats)
        handle = vlm_prune.patch(model, "fopru", 0.3, **options)
        pruned = logits(model, inputs)
        assert all(s["kept"] < s["visual_tokens"] for s in handle.stats)
        assert not torch.allclose(pruned[:, -1], expected[:, -1], atol=1e-4)
        with_cache = greedy(model, inputs)
        assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
        assert torch.equal(with_cache[:, inputs["input_ids"].shape[1]], pruned[:, -1].argmax(-1))
    finally:
        vlm_prune.unpatch(model)
    assert torch.equal(logits(model, inputs), expected)


@pytest.mark.parametrize("video_budget", ["per_frame", "per_video"])
def test_qwen_video_rows(qwen, video_budget):
    """Videos: per frame, each frame keeps its own best rows; per video, the video's t*h rows
    compete as one pool. The counts are the rule's; cache equals no cache."""
    from vlm_prune.video_inputs import qwen_video_inputs

    model, processor = qwen
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    frames = [tiny.random_image(112, 84, seed=i) for i in range(4)]  # 4 x 3 merged tokens a frame
    inputs = qwen_video_inputs(processor, [video + "What happens?"], [frames])
    t, h, w = inputs["video_grid_thw"][0].tolist()
    per_frame_grid = (h // 2, w // 2)
    k = 5 if video_budget == "per_frame" else 9
    with vlm_prune.pruned(model, "fopru", k, strategy="row", video_budget=video_budget) as handle:
        with_cache = greedy(model, inputs)
        kept = handle.kept_indices[0]
        stats = handle.stats[0]
        assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
    width = per_frame_grid[1]
    if video_budget == "per_frame":
        per_frame = math.prod(per_frame_grid)
        assert torch.bincount(kept // per_frame, minlength=t).tolist() == [(k // width) * width] * t
    else:
        assert len(kept) == (k // width) * width
    assert stats["video_kept"] == len(kept)
    rows = (kept // width).tolist()
    assert all(rows.count(r) == width for r in set(rows))  # whole rows only


def test_llava_next_per_image_and_per_crop():
    """LLaVA-NeXT regions (base image, crop grid or each crop): the kept count is the rule's per
    region, known from the image size; pooled is refused (newlines have no significance)."""
    model, processor = tiny.llava_next(seed=5)
    inputs = make_inputs(processor, "llava_next", [(280, 196)], ["What is it?"])
    expected = logits(model, inputs)
    try:
        for budget in ["per_image", "per_crop"]:
            for options in OPTIONS:
                handle = vlm_prune.patch(model, "fopru", 1.0, budget=budget, **options)
                assert torch.equal(logits(model, inputs), expected)
                handle = vlm_prune.patch(model, "fopru", 0.3, budget=budget, **options)
                with_cache = greedy(model, inputs)
                assert handle.stats[0]["kept"] < handle.stats[0]["visual_tokens"]
                assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
        with pytest.raises(ValueError, match="pooled"):
            vlm_prune.patch(model, "fopru", 0.3, budget="pooled")
    finally:
        vlm_prune.unpatch(model)
