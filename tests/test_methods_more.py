"""dct, divprune, visionzip, text_recovery: hand-written references on small tensors, then the
model contracts on every family."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import vlm_prune
from vlm_prune import tiny
from vlm_prune.methods.dct import DCT, dct_matrix, low_pass
from vlm_prune.methods.divprune import max_min_diverse
from vlm_prune.methods.text_recovery import TextRecovery, local_outlier_factor

from .conftest import llava_inputs
from .reference import image_features, reference_logits

# -- DCT ---------------------------------------------------------------------------------------


def cosine_basis(n: int, u: int) -> torch.Tensor:
    """The u-th orthonormal DCT-II basis vector of length n, from the textbook formula."""
    scale = math.sqrt(1 / n) if u == 0 else math.sqrt(2 / n)
    return torch.tensor([scale * math.cos(math.pi * (2 * i + 1) * u / (2 * n)) for i in range(n)])


def test_dct_basis_is_orthonormal_and_matches_the_formula():
    for n in (1, 5, 12, 24):
        basis = dct_matrix(n)
        torch.testing.assert_close(basis @ basis.T, torch.eye(n, dtype=torch.float64))
        for u in range(n):
            torch.testing.assert_close(basis[u].float(), cosine_basis(n, u))


@pytest.mark.parametrize("h, w, rows, cols", [(24, 24, 12, 12), (7, 9, 3, 4), (12, 5, 1, 1)])
def test_constant_grid_stays_constant_and_dc_is_the_mean(h, w, rows, cols):
    grid = torch.full((2, h, w, 3), 0.7)
    torch.testing.assert_close(low_pass(grid, rows, cols), torch.full((2, rows, cols, 3), 0.7))
    raw = low_pass(grid, rows, cols, rescale=False)  # the published form scales the mean
    torch.testing.assert_close(raw, torch.full_like(raw, 0.7 * math.sqrt(h * w / (rows * cols))))
    noisy = torch.randn(1, h, w, 2)
    torch.testing.assert_close(low_pass(noisy, 1, 1)[0, 0, 0], noisy.mean(dim=(1, 2))[0], rtol=1e-5, atol=1e-6)


def test_low_frequency_cosine_is_reproduced_on_the_coarse_grid():
    h, w, rows, cols = 12, 10, 6, 5
    for u, v in [(0, 0), (1, 0), (2, 3), (5, 4)]:
        grid = (cosine_basis(h, u)[:, None] * cosine_basis(w, v)[None, :])[None, ..., None]
        out = low_pass(grid, rows, cols, rescale=False)[0, ..., 0]
        torch.testing.assert_close(out, cosine_basis(rows, u)[:, None] * cosine_basis(cols, v)[None, :])
    high = (cosine_basis(h, 8)[:, None] * cosine_basis(w, 1)[None, :])[None, ..., None]
    assert low_pass(high, rows, cols).abs().max() < 1e-6  # above the cut-off: removed


def test_dct_budget_grid_and_identity():
    feats = torch.randn(1, 24 * 24, 4)
    red = DCT().reduce(feats, (24, 24), 64, {}, {"rescale": True})
    assert red.features.shape == (1, 64, 4) and red.index.shape == (1, 64)
    red = DCT().reduce(feats[:, :60], (6, 10), 20, {}, {"rescale": True})  # non-square, budget not a square
    assert red.features.shape[1] <= 20 and (red.index[0, 1:] > red.index[0, :-1]).all()
    same = DCT().reduce(feats, (24, 24), 576, {}, {"rescale": True})
    assert torch.equal(same.features, feats)


# -- DivPrune ------------------------------------------------------------------------------------


def test_divprune_greedy_matches_a_plain_loop():
    torch.manual_seed(0)
    feats = torch.randn(2, 30, 8)
    picked = max_min_diverse(feats, 7)
    for image in range(2):
        unit = torch.nn.functional.normalize(feats[image], dim=-1)
        dist = 1 - unit @ unit.T
        n = dist.shape[0]
        first = max(range(n), key=lambda i: min(float(dist[i, j]) for j in range(n) if j != i))
        chosen = [first]
        while len(chosen) < 7:
            rest = [i for i in range(n) if i not in chosen]
            chosen.append(max(rest, key=lambda i: min(float(dist[i, c]) for c in chosen)))
        assert picked[image].tolist() == sorted(chosen)


def test_divprune_prefers_distinct_tokens():
    base = torch.eye(4)  # four distinct directions, each repeated
    feats = base.repeat_interleave(5, dim=0)[None]  # [1, 20, 4]
    picked = max_min_diverse(feats, 4)[0]
    assert sorted({int(i) // 5 for i in picked}) == [0, 1, 2, 3]


# -- text recovery ------------------------------------------------------------------------------


def _lof_by_hand(x: list[float], k: int) -> list[float]:
    n = len(x)
    dist = [[abs(a - b) for b in x] for a in x]
    knn = [sorted((j for j in range(n) if j != i), key=lambda j: (dist[i][j], j))[:k] for i in range(n)]
    k_dist = [dist[i][knn[i][-1]] for i in range(n)]
    lrd = [1 / (sum(max(k_dist[o], dist[i][o]) for o in knn[i]) / k + 1e-12) for i in range(n)]
    return [sum(lrd[o] for o in knn[i]) / k / lrd[i] for i in range(n)]


def test_local_outlier_factor_by_hand():
    torch.manual_seed(3)
    points = torch.cat([torch.rand(11) * 0.1, torch.tensor([0.95])])  # no distance ties
    values = points.tolist()
    lof = local_outlier_factor(points[:, None], k=3)
    assert lof.tolist() == pytest.approx(_lof_by_hand(values, 3), rel=1e-4)
    assert int(lof.argmax()) == 11 and lof[11] > 1.5


def test_text_recovery_fixed_budget():
    n, dim = 12, 4
    attention = torch.zeros(1, n)
    attention[0, [2, 7]] = torch.tensor([0.5, 0.4])  # the visual filter keeps these
    question = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    feats = torch.zeros(1, n, dim)
    feats[0, :, 0] = 1.0
    feats[0, 10] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # the token the question asks for
    options = {"mode": "fixed", "keep_share": 0.67, "layout": "raster"}
    red = TextRecovery().reduce(feats, (3, 4), 4, {"cls_attention": attention, "question": question}, options)
    # keep 4 = 1 summary + 3 survivors: round(3 * 0.67) = 2 by attention (2, 7), 1 recovered (10)
    survivors = [2, 7, 10]
    assert set(survivors) <= set(red.index[0].tolist()) and red.index.shape == (1, 4)
    summary_slot = (set(red.index[0].tolist()) - set(survivors)).pop()
    rest = [i for i in range(n) if i not in survivors]
    assert summary_slot in rest
    assert red.features[0, red.index[0].tolist().index(10)].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_text_recovery_adaptive_counts_outliers():
    n = 40
    attention = torch.full((1, n), 0.01) + torch.linspace(0, 0.002, n)[None]
    attention[0, [3, 17, 30]] = torch.tensor([0.3, 0.25, 0.2])
    feats = torch.randn(1, n, 6)
    question = torch.randn(1, 6)
    signals = {"cls_attention": attention, "question": question, "keys": torch.randn(1, n, 5)}
    red = TextRecovery().reduce(feats, (5, 8), 30, signals, {"mode": "adaptive", "keep_share": 0.75, "layout": "raster"})
    kept = red.index[0].tolist() if isinstance(red.index, torch.Tensor) else red.index[0].tolist()
    assert {3, 17, 30} <= set(kept) and len(kept) < 30


# -- in the models: every family ---------------------------------------------------------------


NEW_METHODS = [("dct", {}), ("divprune", {}), ("visionzip", {}), ("text_recovery", {}),
               ("text_recovery", {"mode": "fixed"}), ("dct", {"rescale": True})]


@pytest.fixture(scope="module")
def family_models():
    built = {
        "llava": tiny.llava(),
        "llava_next": tiny.llava_next(),
        "qwen2_vl": tiny.qwen2_vl(),
        "qwen2_5_vl": tiny.qwen2_vl(version="2.5"),
    }
    yield built
    for model, _ in built.values():
        vlm_prune.unpatch(model)


def _inputs(family, processor, rows=(0, 1)):
    questions = ["What is it?", "How many green triangles are there?"]
    sizes = [(280, 196), (100, 300)]
    if family in ("llava", "llava_next"):
        texts = [f"USER: <image>\n{questions[r]} ASSISTANT:" for r in rows]
    else:
        texts = [tiny.qwen_prompt(questions[r]) for r in rows]
    return processor(images=[tiny.random_image(*sizes[r], seed=r) for r in rows], text=texts,
                     return_tensors="pt", padding=True)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family, method_options", list(itertools.product(
    ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"], NEW_METHODS)))
def test_contracts_on_every_family(family_models, family, method_options):
    method, options = method_options
    model, processor = family_models[family]
    inputs = _inputs(family, processor)
    expected = _logits(model, inputs)
    handle = vlm_prune.patch(model, method, 1.0, **options)
    assert torch.equal(_logits(model, inputs), expected)  # keep=1.0: the identity
    handle = vlm_prune.patch(model, method, 0.25, **options)
    batch_last = _logits(model, inputs)[:, -1]
    assert all(s["kept"] < s["visual_tokens"] for s in handle.stats)
    with torch.no_grad():
        with_cache = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        without = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    for row in range(2):
        single = _inputs(family, processor, rows=(row,))
        torch.testing.assert_close(_logits(model, single)[0, -1], batch_last[row], rtol=1e-4, atol=1e-5)
    handle.remove()


def test_dct_on_llava_runs_before_the_projector(family_models):
    """LLaVA-1.5: low-pass of the projector's input, then the projector, equals the patched model
    (the release's form: orthonormal DCT, an inverse of the coarse size, no rescaling)."""
    model, processor = family_models["llava"]
    inputs = llava_inputs(processor, ["USER: <image>\nWhat is it? ASSISTANT:"], [(280, 196)])
    seen = {}
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    image_features(model, inputs["pixel_values"])
    hook.remove()
    pre = seen["x"][0].view(8, 8, -1)  # [h, w, Dv]
    a8, a4 = (torch.stack([cosine_basis(n, u) for u in range(n)]) for n in (8, 4))
    coarse = torch.einsum("rh,hwd,cw->rcd", a4.T @ a8[:4], pre, a4.T @ a8[:4])  # the release: no rescaling
    with torch.no_grad():
        kept_features = model.model.multi_modal_projector(coarse.reshape(16, -1))
    centres = [8 * (2 * r) + 2 * c for r in range(4) for c in range(4)]
    handle = vlm_prune.patch(model, "dct", 16)
    out = _logits(model, inputs)[0]
    assert handle.kept_indices[0].tolist() == centres
    expected = reference_logits(model, inputs["input_ids"][0], [kept_features], [centres], "renumber")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    handle.remove()


def test_text_recovery_question_is_the_instruction_embedding(family_models):
    """The recovered tokens change with the question (text guidance reaches the method)."""
    model, processor = family_models["llava"]
    picks = []
    for question in ["What is it?", "How many green triangles are there in the picture?"]:
        inputs = llava_inputs(processor, [f"USER: <image>\n{question} ASSISTANT:"], [(280, 196)])
        handle = vlm_prune.patch(model, "text_recovery", 16, mode="fixed", keep_share=0.0)  # all recovered by the question
        _logits(model, inputs)
        picks.append(handle.kept_indices[0].tolist())
    handle.remove()
    assert picks[0] != picks[1]


@pytest.mark.parametrize("method, options, error, fragment", [
    ("dct", {"rescale": "yes"}, ValueError, "rescale='yes'"),
    ("text_recovery", {"mode": "lof"}, ValueError, "mode='lof'"),
    ("text_recovery", {"keep_share": 1.5}, ValueError, "keep_share=1.5"),
    ("visionzip", {"layers": [0]}, ValueError, "unknown option"),
])
def test_bad_options(family_models, method, options, error, fragment):
    model, _ = family_models["llava"]
    with pytest.raises(error, match=fragment):
        vlm_prune.patch(model, method, 16, **options)
    assert vlm_prune.get_handle(model) is None
