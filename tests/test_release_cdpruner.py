"""`cdpruner` equals CDPruner's release (github Theia-4869/CDPruner @ 9541616, llava/model/llava_arch.py
`encode_images`) with its documented departures, checked against a reference written here from the
release's rules with none of vlm_prune's code: relevance = min-max normalised cosine to the
instruction ((x - min + 1e-6) / (max - min)), kernel L_ij = r_i cos(t_i, t_j) r_j on the LLM-space
tokens, and the greedy MAP of the DPP done the slow, obvious way -- each step adds the token that
maximises log det(L_Y) over the candidates, by torch.linalg.slogdet in float64 -- kept tokens in
raster order."""

from __future__ import annotations

import math

import pytest
import torch

import vlm_prune
import vlm_prune.methods.cdpruner  # noqa: F401  (registers the method)
from vlm_prune import tiny
from vlm_prune.methods.cdpruner import CDPruner, greedy_map

from .reference import image_features, reference_logits
from .test_families import greedy, logits

DEFAULTS = {"relevance": "negated", "theta": None}  # the release


# -- the reference, from the release's rules ----------------------------------------------------

def ref_relevance(tokens: torch.Tensor, question: torch.Tensor, sign: float = 1.0, theta=None) -> list[float]:
    """One image: tokens [N, D], question [D] -> r (float64 list). sign=0: no condition (r = 1)."""
    if sign == 0:
        r = [1.0] * tokens.shape[0]
    else:
        q = question.double()
        x = [sign * float(t.double() @ q / (t.double().norm() * q.norm())) for t in tokens]
        low, high = min(x), max(x)
        r = [(v - low + 1e-6) / (high - low) for v in x]
    if theta is not None:
        alpha = theta / (2 * (1 - theta))
        r = [math.exp(alpha * v) for v in r]
    return r


def ref_kernel(tokens: torch.Tensor, r: list[float], cosine: bool = True) -> torch.Tensor:
    t = tokens.double()
    if cosine:
        t = t / t.norm(dim=-1, keepdim=True)
    rr = torch.tensor(r, dtype=torch.float64)
    s = t @ t.T
    if cosine:
        s.fill_diagonal_(1.0)  # cos(t, t) = 1
    return rr[:, None] * s * rr[None, :]


def refgreedy(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP by explicit log-determinants: add argmax_j log det(L[Y+j, Y+j]), first index on ties."""
    chosen: list[int] = []
    for _ in range(k):
        best, best_j = -math.inf, None
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            idx = torch.tensor(chosen + [j])
            sign, logdet = torch.linalg.slogdet(kernel[idx][:, idx])
            value = float(logdet) if sign > 0 else -math.inf
            if value > best:
                best, best_j = value, j
        chosen.append(best_j)
    return sorted(chosen)


def ref_select(tokens, question, k, sign=-1.0, theta=None, cosine=True) -> list[int]:
    """The release: sign -1 (x = -cos); +1 is the paper's sign, 0 no condition."""
    return refgreedy(ref_kernel(tokens, ref_relevance(tokens, question, sign, theta), cosine), k)


def run(features, question, k, **options):
    reduction = CDPruner().reduce(features, (1, features.shape[1]), k, {"question": question},
                                  {**DEFAULTS, **options})
    return reduction


CASES = [(37, 53, 11), (61, 97, 23), (45, 19, 7), (29, 33, 28)]  # (N, D, k): odd sizes, N > D too


def _inputs(seed, n, d, images=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # a shared component makes the cosines uneven, as real tokens' are
    base = torch.randn(1, 1, d, generator=g)
    features = (torch.randn(images, n, d, generator=g) + 0.7 * base).to(dtype)
    question = torch.randn(images, d, generator=g).to(dtype)
    return features, question


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n, d, k", CASES)
def test_selection_equals_the_release_rules(seed, n, d, k):
    features, question = _inputs(seed, n, d)
    reduction = run(features, question, k)
    for i in range(features.shape[0]):
        expected = ref_select(features[i], question[i], k)
        assert reduction.index[i].tolist() == expected
        assert torch.equal(reduction.features[i], features[i, expected])  # kept unchanged, raster order


@pytest.mark.parametrize("seed", [3, 4])
def test_bf16_inputs(seed):
    features, question = _inputs(seed, 41, 67, dtype=torch.bfloat16)
    reduction = run(features, question, 13)
    assert reduction.features.dtype == torch.bfloat16
    for i in range(features.shape[0]):
        assert reduction.index[i].tolist() == ref_select(features[i], question[i], 13)


@pytest.mark.parametrize("seed", [5, 6])
@pytest.mark.parametrize("options, ref", [
    ({"relevance": "cosine"}, {"sign": 1.0}),
    ({"relevance": "none"}, {"sign": 0}),
    ({"theta": 0.5}, {"theta": 0.5}),
    ({"relevance": "negated", "theta": 0.8}, {"sign": -1.0, "theta": 0.8}),
])
def test_options_equal_their_rules(seed, options, ref):
    features, question = _inputs(seed, 39, 47)
    reduction = run(features, question, 12, **options)
    for i in range(features.shape[0]):
        assert reduction.index[i].tolist() == ref_select(features[i], question[i], 12, **ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mutated_rules_select_otherwise(seed):
    """The test has teeth: each rule changed alone changes the reference's selection on these inputs
    (for at least one image), so an implementation with that rule wrong fails the parity test."""
    n, d, k = 61, 97, 23
    features, question = _inputs(seed, n, d)
    right = [ref_select(features[i], question[i], k) for i in range(3)]
    mutations = {
        "no relevance": [ref_select(features[i], question[i], k, sign=0) for i in range(3)],
        "the paper's +cos, not the release's -cos": [ref_select(features[i], question[i], k, sign=1.0)
                                                     for i in range(3)],
        "dot product, not cosine": [ref_select(features[i], question[i], k, cosine=False) for i in range(3)],
        "exp relevance": [ref_select(features[i], question[i], k, theta=0.5) for i in range(3)],
        "top-k relevance": [sorted(torch.tensor(ref_relevance(features[i], question[i], -1.0)).topk(k).indices.tolist())
                            for i in range(3)],
    }
    for name, picks in mutations.items():
        assert picks != right, name
    assert run(features, question, k).index.tolist() == right


def test_fast_greedy_log_det_equals_slogdet():
    """The incremental Cholesky's residuals are det ratios: the sum of the log gains is log det(L_Y)."""
    features, question = _inputs(9, 57, 81, images=2)
    from vlm_prune.methods.cdpruner import conditional_kernel, relevance

    kernel = conditional_kernel(features, relevance(features, question))
    picks = greedy_map(kernel.double(), 17)
    for i in range(2):
        idx = picks[i]
        assert torch.linalg.slogdet(kernel[i].double()[idx][:, idx])[0] > 0
        assert picks[i].tolist() == refgreedy(kernel[i].double(), 17)


def test_batch_equals_one_by_one():
    features, question = _inputs(11, 43, 29, images=4)
    batched = run(features, question, 9).index
    for i in range(4):
        assert torch.equal(batched[i], run(features[i:i + 1], question[i:i + 1], 9).index[0])


def test_rank_exhaustion_and_duplicates_stay_finite():
    """k above the kernel's rank (more tokens than dimensions; duplicated tokens): the greedy part
    follows the rules, the rest goes by relevance -- k distinct tokens, no NaN."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 31, 4, generator=g)
    features[1, 10:20] = features[1, 3]  # duplicates
    question = torch.randn(2, 4, generator=g)
    reduction = run(features, question, 12)
    for i in range(2):
        idx = reduction.index[i].tolist()
        assert len(set(idx)) == 12 and idx == sorted(idx)
    # below the rank it is the plain greedy
    assert run(features, question, 3).index[0].tolist() == ref_select(features[0], question[0], 3)
    # all tokens identical: every residual after the first pick is zero
    same = torch.randn(1, 1, 8, generator=g).expand(1, 15, 8).contiguous()
    idx = run(same, torch.randn(1, 8, generator=g), 5).index[0].tolist()
    assert len(set(idx)) == 5


def test_keep_all_and_constant_relevance():
    features, question = _inputs(12, 21, 31, images=2)
    reduction = run(features, question, 21)
    assert torch.equal(reduction.features, features)
    assert reduction.index[0].tolist() == list(range(21))
    # a question orthogonal to all the tokens: x constant, r = 1 (the release divides by zero)
    tokens = torch.zeros(1, 9, 6)
    tokens[0, :, :3] = torch.randn(9, 3, generator=torch.Generator().manual_seed(1))
    q = torch.zeros(1, 6)
    q[0, 5] = 1.0
    assert run(tokens, q, 3).index.tolist() == run(tokens, q, 3, relevance="none").index.tolist()


def test_options_are_validated():
    with pytest.raises(ValueError):
        CDPruner.validate_options({"theta": 1.0})
    with pytest.raises(ValueError):
        CDPruner.validate_options({"relevance": "attention"})
    assert CDPruner.validate_options({}) == DEFAULTS


# -- end to end on tiny models ------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    built = {"llava": tiny.llava(seed=1), "qwen2_vl": tiny.qwen2_vl(version="2"), "llava_next": tiny.llava_next()}
    yield built
    for model, _ in built.values():
        vlm_prune.unpatch(model)


def _inputs_for(family, processor, questions=("How many red circles are in the picture?", "What is it?")):
    sizes = [(150, 110), (100, 300)]
    images = [tiny.random_image(w, h, seed=s) for s, (w, h) in enumerate(sizes)]
    if family == "llava":
        texts = [f"USER: <image>\n{q} ASSISTANT:" for q in questions]
    else:
        texts = [tiny.qwen_prompt(q) for q in questions]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_keep_all_logits_identical_keep_less_changes_them(models, family):
    model, processor = models[family]
    inputs = _inputs_for(family, processor)
    plain = logits(model, inputs)
    with vlm_prune.pruned(model, method="cdpruner", keep=1.0):
        torch.testing.assert_close(logits(model, inputs), plain, rtol=0, atol=0)
    handle = vlm_prune.patch(model, "cdpruner", 0.25)
    try:
        pruned = logits(model, inputs)
        assert all(s["kept"] < s["visual_tokens"] for s in handle.stats)
        assert pruned.shape[1] < plain.shape[1]
        assert not torch.allclose(pruned[:, -1], plain[:, -1])
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_generate_with_cache_equals_without(models, family):
    model, processor = models[family]
    inputs = _inputs_for(family, processor)
    handle = vlm_prune.patch(model, "cdpruner", 0.25)
    try:
        with_cache = greedy(model, inputs)
        stats = handle.stats
        assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
        assert handle.stats == stats
        first = with_cache[:, inputs["input_ids"].shape[1]]
        assert torch.equal(first, logits(model, inputs)[:, -1].argmax(-1))
    finally:
        handle.remove()


def _reference_selection(model, inputs, k):
    """Per prompt of a one-image-per-row batch: the reference's kept slots, from the model's own
    LLM-space image tokens and the mean input embedding of the text after the image."""
    feats = image_features(model, inputs["pixel_values"]) if "image_grid_thw" not in inputs else None
    if feats is None:
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        feats = list(out.pooler_output)
    selections = []
    for row, tokens in enumerate(feats):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        image = (ids == model.config.image_token_id).nonzero().flatten()
        with torch.no_grad():
            question = model.model.get_input_embeddings()(ids[image[-1] + 1:]).mean(0)
        selections.append((ref_select(tokens, question, k), tokens, ids))
    return selections


def test_llava_end_to_end_equals_the_reference(models):
    model, processor = models["llava"]
    inputs = _inputs_for("llava", processor)
    handle = vlm_prune.patch(model, "cdpruner", 13)
    try:
        got = logits(model, inputs)
        kept = [t.tolist() for t in handle.kept_indices]
    finally:
        handle.remove()
    one = processor(images=[tiny.random_image(150, 110, seed=0)],
                    text=["USER: <image>\nHow many red circles are in the picture? ASSISTANT:"], return_tensors="pt")
    (slots, tokens, ids), = _reference_selection(model, one, 13)
    assert kept[0] == slots
    handle = vlm_prune.patch(model, "cdpruner", 13)
    try:
        alone = logits(model, one)[0]
    finally:
        handle.remove()
    expected = reference_logits(model, ids, [tokens[slots]], [slots], "renumber")
    torch.testing.assert_close(alone, expected, rtol=1e-5, atol=1e-5)
    assert got.shape[0] == 2


def test_qwen_end_to_end_selection_equals_the_reference(models):
    model, processor = models["qwen2_vl"]
    one = processor(images=[tiny.random_image(150, 110, seed=0)],
                    text=[tiny.qwen_prompt("How many red circles are in the picture?")], return_tensors="pt")
    handle = vlm_prune.patch(model, "cdpruner", 9)
    try:
        logits(model, one)
        kept = [t.tolist() for t in handle.kept_indices]
    finally:
        handle.remove()
    (slots, _, _), = _reference_selection(model, one, 9)
    assert kept[0] == slots


def test_llava_next_keeps_k_per_crop_and_the_newlines(models):
    """The release's LLaVA-NeXT budget: k of the base image and of every crop, newlines on top."""
    model, processor = models["llava_next"]
    inputs = processor(images=[tiny.random_image(280, 196, seed=0)], text=["USER: <image>\nWhat is it? ASSISTANT:"],
                       return_tensors="pt")
    plain = logits(model, inputs)
    with vlm_prune.pruned(model, method="cdpruner", keep=1.0):
        torch.testing.assert_close(logits(model, inputs), plain, rtol=0, atol=0)
    kept = {}
    for budget in (None, "per_crop", "per_image", "pooled"):
        handle = vlm_prune.patch(model, "cdpruner", 5, **({"budget": budget} if budget else {}))
        try:
            with_cache = greedy(model, inputs)
            assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
            kept[budget] = handle.stats[0]["kept"]
        finally:
            handle.remove()
    assert kept[None] == kept["per_crop"] > kept["per_image"] >= kept["pooled"] == 5


VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.mark.parametrize("video_budget", ["per_frame", "per_video"])
def test_qwen_video_and_image_in_one_prompt(models, video_budget):
    from vlm_prune.video_inputs import qwen_video_inputs

    model, processor = models["qwen2_vl"]
    clip = [tiny.random_image(112, 84, seed=i) for i in range(4)]
    inputs = qwen_video_inputs(processor, [tiny.qwen_prompt("and then") + VIDEO + "What moves?"], [clip],
                               images=[tiny.random_image(84, 112, seed=7)])
    plain = logits(model, inputs)
    with vlm_prune.pruned(model, method="cdpruner", keep=1.0, video_budget=video_budget):
        torch.testing.assert_close(logits(model, inputs), plain, rtol=0, atol=0)
    handle = vlm_prune.patch(model, "cdpruner", 0.3, video_budget=video_budget)
    try:
        with_cache = greedy(model, inputs)
        stats = handle.stats[0]
        assert stats["video_kept"] < stats["video_tokens"] and stats["kept"] < stats["visual_tokens"]
        assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
    finally:
        handle.remove()


def test_the_instruction_changes_the_selection(models):
    model, processor = models["llava"]
    chosen = []
    for question in ["How many red circles are in the picture?", "Describe the blue square at the top left corner."]:
        one = processor(images=[tiny.random_image(150, 110, seed=0)], text=[f"USER: <image>\n{question} ASSISTANT:"],
                        return_tensors="pt")
        handle = vlm_prune.patch(model, "cdpruner", 13)
        try:
            logits(model, one)
            chosen.append(handle.kept_indices[0].tolist())
        finally:
            handle.remove()
        handle = vlm_prune.patch(model, "cdpruner", 13, relevance="none")
        try:
            logits(model, one)
            unconditioned = handle.kept_indices[0].tolist()
        finally:
            handle.remove()
        assert unconditioned != chosen[-1]
    assert chosen[0] != chosen[1]


def test_the_registered_default_is_the_release():
    """The release negates the cosine (clip_encoder.py); the default must be that rule."""
    from vlm_prune.methods.cdpruner import CDPruner

    assert {name: option.default for name, option in CDPruner.options.items()} == DEFAULTS
