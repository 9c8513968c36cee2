"""In-LLM pruning (transition = TransPrune, fastv = FastV) on tiny models of all four families."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

import vlm_prune
from vlm_prune import tiny
from vlm_prune.flops import prefill_flops, stage_lengths
from vlm_prune.methods.transition import Transition

from .conftest import llava_inputs
from .test_families import greedy, logits, make_inputs

PROMPTS = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nHow many green triangles are there? ASSISTANT:"]
SIZES = [(140, 100), (90, 120)]
# three stages on a 4-layer decoder; and FastV after layer 2
CONFIGS = [
    ("transition", dict(schedule=[(1, 0.75), (2, 0.5), (3, None)])),
    ("transition", dict(alpha=1.0, direction="abs")),
    # the behaviour before transition followed its release: original positions, IGA from the
    # pruning layer's own q/k, TTV softmax over the visual tokens
    ("transition", dict(schedule=[(1, 0.75), (2, 0.5), (3, None)], positions="original", iga_layer="own",
                        ttv_softmax="visual")),
    ("fastv", dict(layer=2)),
    ("fastv", dict(layer=1, query="instruction")),
]
# methods that merge (a kept token's state changes): not a masked copy of the model
MERGING = [("visiondrop", dict(vision_stage=False))]


@pytest.fixture(scope="module")
def llava4():
    model, processor = tiny.llava(text_layers=4, seed=1)
    yield model, processor
    vlm_prune.unpatch(model)


@pytest.fixture(scope="module")
def families():
    built = {
        "llava_next": tiny.llava_next(text_layers=3),
        "qwen2_vl": tiny.qwen2_vl(text_layers=3),
        "qwen2_5_vl": tiny.qwen2_vl(version="2.5", text_layers=3),
    }
    yield built
    for model, _ in built.values():
        vlm_prune.unpatch(model)


SIZES_F = [(280, 196), (100, 300)]
QUESTIONS_F = ["What is it?", "How many green triangles are there?"]


def family_inputs(family, processor, rows=(0, 1)):
    """Rows of the two-sample batch below (each row: one image, one question, seed = row)."""
    return make_inputs(processor, family, [SIZES_F[r] for r in rows], [QUESTIONS_F[r] for r in rows], seeds=list(rows))


def masked_reference(model, inputs, stage_columns, stage_layers, renumber=False):
    """The unpatched model with the dropped keys masked per layer instead of removed.

    stage_columns[s]: [B, L_s] original columns kept from layer stage_layers[s] (0-based) on.
    renumber: those layers see each token at its position minus the tokens dropped before it
    (the plain forward's positions are 0..L-1).
    Returns logits [B, L, V] over the full sequence.
    """
    length = inputs["input_ids"].shape[1]
    pad = inputs["attention_mask"].bool()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    overrides = []
    for columns in stage_columns:
        kept = torch.zeros(columns.shape[0], length, dtype=torch.bool)
        for row, cols in enumerate(columns):
            kept[row, cols[cols >= 0]] = True
        allowed = causal[None] & (kept & pad)[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool)[None]  # no empty rows for dropped queries
        override = {"attention_mask": torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]}
        if renumber:
            dropped_before = torch.cumsum((~kept).long(), 1) - (~kept).long()
            override["position_ids"] = torch.arange(length)[None] - dropped_before
        overrides.append(override)
    reference = copy.deepcopy(model)
    language_model = reference.model.language_model
    language_model.set_attn_implementation("eager")

    def hook(module, args, kwargs, override):
        kwargs = {**kwargs, **override}
        if "position_ids" in override:
            kwargs["position_embeddings"] = language_model.rotary_emb(args[0], override["position_ids"])
        return args, kwargs

    for i, layer in enumerate(language_model.layers):
        stage = sum(1 for start in stage_layers if start <= i) - 1
        if stage >= 0:
            layer.register_forward_pre_hook(partial(hook, override=overrides[stage]), with_kwargs=True)
    with torch.no_grad():
        return reference(**inputs).logits


# -- contracts -------------------------------------------------------------------------------


@pytest.mark.parametrize("method, options", CONFIGS + MERGING)
def test_keep_all_gives_identical_logits(llava4, method, options):
    model, processor = llava4
    inputs = llava_inputs(processor, PROMPTS, SIZES)
    expected = logits(model, inputs)
    handle = vlm_prune.patch(model, method, 1.0, **options)
    assert torch.equal(logits(model, inputs), expected)
    assert handle.stats == [{"visual_tokens": 64, "kept": 64}] * 2
    handle.remove()


@pytest.mark.parametrize("method, options", CONFIGS)
def test_prefill_equals_the_model_with_dropped_keys_masked(llava4, method, options):
    model, processor = llava4
    inputs = llava_inputs(processor, PROMPTS, SIZES)
    handle = vlm_prune.patch(model, method, 6, **options)
    out = logits(model, inputs)
    engine = handle._patch
    columns = engine.stage_index
    starts = [stage.after_layer for stage in engine.stages]
    handle.remove()
    reference = masked_reference(model, inputs, columns, starts, renumber=engine.renumber)
    # LLaVA: transition renumbers by default
    assert engine.renumber == (method == "transition" and options.get("positions") != "original")
    final = columns[-1]
    assert handle.stats == [{"visual_tokens": 64, "kept": 6}] * 2
    assert out.shape[1] == final.shape[1]
    for row in range(2):  # every real (not padding) token the last layer saw
        valid = (final[row] >= 0) & inputs["attention_mask"][row, final[row].clamp(min=0)].bool()
        assert int(valid.sum()) == int(inputs["attention_mask"][row].sum()) - 58
        torch.testing.assert_close(out[row, valid], reference[row, final[row, valid]], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, options", CONFIGS + MERGING)
def test_generate_with_cache_equals_without(llava4, method, options):
    model, processor = llava4
    inputs = llava_inputs(processor, PROMPTS, SIZES)
    handle = vlm_prune.patch(model, method, 6, **options)
    with_cache = greedy(model, inputs)
    assert [s["kept"] for s in handle.stats] == [6, 6]
    assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
    assert torch.equal(with_cache[:, inputs["input_ids"].shape[1]], logits(model, inputs)[:, -1].argmax(-1))
    handle.remove()


@pytest.mark.parametrize("method, options", [("transition", dict(schedule=[(1, 0.5), (3, None)])),
                                             ("visiondrop", dict(vision_stage=False, schedule=[(1, 0.5), (3, None)]))])
def test_batch_with_left_padding_equals_each_alone(llava4, method, options):
    """Rows with different prompt lengths and numbers of images (so different kept counts)."""
    model, processor = llava4
    prompts = [PROMPTS[0], "USER: <image> <image>\nCompare the two pictures. ASSISTANT:"]
    per_row = [[(140, 100)], [(90, 120), (60, 60)]]
    batch = llava_inputs(processor, prompts, [s for row in per_row for s in row])
    handle = vlm_prune.patch(model, method, 5, **options)
    batch_last = logits(model, batch)[:, -1]
    batch_gen = greedy(model, batch)[:, -5:]
    assert [s["kept"] for s in handle.stats] == [5, 10]
    seed = 0
    for row, (prompt, sizes) in enumerate(zip(prompts, per_row)):
        single = llava_inputs(processor, [prompt], sizes, seeds=list(range(seed, seed + len(sizes))))
        seed += len(sizes)
        torch.testing.assert_close(logits(model, single)[0, -1], batch_last[row], rtol=1e-4, atol=1e-5)
        assert torch.equal(greedy(model, single)[0, -5:], batch_gen[row])
    handle.remove()


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("method, options", [("transition", {}), ("fastv", {"layer": 1}),
                                             ("visiondrop", {"vision_stage": False})])
def test_families(families, family, method, options):
    model, processor = families[family]
    inputs = family_inputs(family, processor)
    expected = logits(model, inputs)
    handle = vlm_prune.patch(model, method, 1.0, **options)
    assert torch.equal(logits(model, inputs), expected)
    handle = vlm_prune.patch(model, method, 0.2, **options)
    with_cache = greedy(model, inputs)
    stats = handle.stats
    assert all(s["kept"] == round(0.2 * s["visual_tokens"]) for s in stats)
    assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
    batch_last = logits(model, inputs)[:, -1]
    for row in range(2):  # rows keep different counts: re-padded inside the decoder
        single = family_inputs(family, processor, rows=(row,))
        torch.testing.assert_close(logits(model, single)[0, -1], batch_last[row], rtol=1e-4, atol=1e-5)
    vlm_prune.unpatch(model)
    assert torch.equal(logits(model, inputs), expected)


# -- signals against hand computation -------------------------------------------------------------


def _eager_attentions(model, inputs):
    reference = copy.deepcopy(model)
    reference.model.language_model.set_attn_implementation("eager")
    with torch.no_grad():
        return reference(**inputs, output_attentions=True).attentions


@pytest.mark.parametrize("query", ["instruction", "last"])
def test_attention_rows_equal_eager_attention(llava4, query):
    """FastV/IGA rows: the same numbers as the eager attention map of that layer."""
    model, processor = llava4
    inputs = llava_inputs(processor, PROMPTS, SIZES)
    attentions = _eager_attentions(model, inputs)
    handle = vlm_prune.patch(model, "fastv", 8, layer=2, query=query)
    logits(model, inputs)
    signal = handle._patch._attention  # computed at layer 2 (1-indexed) on the full sequence
    handle.remove()
    attn = attentions[1].mean(1)  # [B, L, L], heads averaged
    ids = inputs["input_ids"]
    is_image = ids == model.config.image_token_id
    for row in range(2):
        real = inputs["attention_mask"][row].bool()
        last_image = int(is_image[row].nonzero().max())
        if query == "last":
            rows = [ids.shape[1] - 1]
        else:
            rows = [j for j in range(last_image + 1, ids.shape[1]) if real[j]]
        expected = attn[row, rows].mean(0)
        torch.testing.assert_close(signal[row], expected, rtol=1e-4, atol=1e-6)


def test_visual_rows_score_each_image_by_its_own_rows(llava4):
    """VisionDrop's rows: an image's columns averaged over that image's own rows (two images in
    one row), the same numbers as the eager attention map of the scoring layer (the next one)."""
    model, processor = llava4
    prompts = [PROMPTS[0], "USER: <image> <image>\nCompare the two pictures. ASSISTANT:"]
    inputs = llava_inputs(processor, prompts, [(140, 100), (90, 120), (60, 60)])
    attentions = _eager_attentions(model, inputs)
    handle = vlm_prune.patch(model, "visiondrop", 8, vision_stage=False, schedule=[(2, None)])
    logits(model, inputs)
    signal = handle._patch._attention  # layer 3 (1-indexed) on layer 2's output, nothing dropped yet
    handle.remove()
    attn = attentions[2].mean(1)
    is_image = inputs["input_ids"] == model.config.image_token_id
    spans = 0
    for row in range(2):
        columns = is_image[row].nonzero().flatten().tolist()
        runs = [[columns[0]]]
        for c in columns[1:]:
            runs[-1].append(c) if c == runs[-1][-1] + 1 else runs.append([c])
        for span in runs:
            expected = attn[row][span][:, span].mean(0)
            torch.testing.assert_close(signal[row, span], expected, rtol=1e-4, atol=1e-6)
            spans += 1
    assert spans == 3


def _hand_ttv(model, inputs, layer_1_indexed, direction, domain="visual"):
    """TTV of one decoder layer from its captured sub-module inputs and outputs, the softmax
    over each row's visual tokens (domain "visual") or all its real tokens ("sequence")."""
    layer = model.model.language_model.layers[layer_1_indexed - 1]
    seen = {}
    hooks = [
        layer.self_attn.register_forward_hook(
            lambda m, a, kw, out: seen.update(attn=(kw["hidden_states"], out[0])), with_kwargs=True),
        layer.mlp.register_forward_hook(lambda m, a, out: seen.update(mlp=(a[0], out))),
    ]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    visual = inputs["input_ids"] == model.config.image_token_id
    over = visual if domain == "visual" else inputs["attention_mask"].bool()
    total = 0
    for t_in, t_out in seen.values():
        cos = torch.nn.functional.cosine_similarity(t_out.float(), t_in.float(), dim=-1)
        change = 1 - (cos.abs() if direction == "abs" else cos)
        ratio = t_out.float().norm(dim=-1) / t_in.float().norm(dim=-1)
        weights = torch.zeros_like(change)
        for row in range(change.shape[0]):
            weights[row, over[row]] = torch.softmax(change[row, over[row]], dim=0)
        total = total + weights * ratio
    return total, visual


@pytest.mark.parametrize("direction, domain", [("signed", "sequence"), ("abs", "sequence"), ("signed", "visual"),
                                               ("abs", "visual")])
def test_ttv_selection_equals_hand_computation(llava4, direction, domain):
    """The TTV signal (released default: softmax over the row's real tokens, padding excluded;
    ttv_softmax="visual": over its visual tokens) equals the hand computation; padded rows."""
    model, processor = llava4
    inputs = llava_inputs(processor, PROMPTS, SIZES)
    ttv, visual = _hand_ttv(model, inputs, 2, direction, domain)
    options = {} if domain == "sequence" else {"ttv_softmax": domain}
    handle = vlm_prune.patch(model, "transition", 9, alpha=1.0, direction=direction, schedule=[(2, None)], **options)
    method, signals = handle._patch.method, []
    score = method.score
    method.score = lambda given, visual, opts: signals.append(given["transition"]) or score(given, visual, opts)
    logits(model, inputs)
    kept = handle.kept_indices
    handle.remove()
    (signal,) = signals  # one stage, before any token is dropped: the prompt's columns
    for row in range(2):
        torch.testing.assert_close(signal[row, visual[row]], ttv[row, visual[row]], rtol=1e-5, atol=1e-8)
        scores = ttv[row, visual[row]]
        assert kept[row].tolist() == sorted(scores.topk(9).indices.tolist())


def test_transition_score_mixes_ttv_and_iga(llava4):
    """alpha weighs the normalised signals; with iga_layer="own" and ttv_softmax="visual" (the
    behaviour before vlm_prune followed the release) IGA is the pruning layer's own eager
    attention map."""
    model, processor = llava4
    inputs = llava_inputs(processor, PROMPTS, SIZES)
    ttv, visual = _hand_ttv(model, inputs, 2, "signed")
    attn = _eager_attentions(model, inputs)[1].mean(1)
    handle = vlm_prune.patch(model, "transition", 9, alpha=0.3, schedule=[(2, None)], iga_layer="own",
                             ttv_softmax="visual")
    logits(model, inputs)
    kept = handle.kept_indices
    handle.remove()
    ids = inputs["input_ids"]
    for row in range(2):
        real = inputs["attention_mask"][row].bool()
        last_image = int(visual[row].nonzero().max())
        rows = [j for j in range(last_image + 1, ids.shape[1]) if real[j]]
        iga = attn[row, rows].mean(0)[visual[row]]
        t = ttv[row, visual[row]]
        score = 0.3 * t / t.sum() + 0.7 * iga / iga.sum()
        assert kept[row].tolist() == sorted(score.topk(9).indices.tolist())


# -- schedule, errors, FLOPs --------------------------------------------------------------------


def test_default_schedule_is_the_released_one_scaled():
    method = Transition()
    opts = Transition.validate_options({})
    stages = method.stages(opts, 0.125, 32)
    assert [(s.after_layer, s.keep) for s in stages] == [(7, 0.875), (9, 0.625), (12, 0.125)]
    assert [s.after_layer for s in method.stages(opts, 0.125, 40)] == [9, 11, 15]
    assert [(s.after_layer, s.keep) for s in method.stages(opts, 64, 8)] == [(2, 0.625), (3, 64)]


@pytest.mark.parametrize(
    "method, options, error, fragment",
    [
        ("transition", dict(schedule=[(3, 0.5), (2, None)]), ValueError, "strictly increasing"),
        ("transition", dict(schedule=[(1, 0.5), (9, None)]), ValueError, r"after_layer=9 is outside \[1, 3\]"),
        ("transition", dict(schedule=[(1, 1.5), (2, None)]), ValueError, "keep=1.5"),
        ("transition", dict(schedule=[(1, 0.5), (2, 0.25)]), ValueError, "the last stage keeps 0.25 but keep=8"),
        ("transition", dict(schedule="7,9,12"), TypeError, "schedule="),
        ("transition", dict(alpha=2), ValueError, "alpha=2"),
        ("transition", dict(iga_layer="previous"), ValueError, "iga_layer='previous'"),
        ("transition", dict(ttv_softmax="image"), ValueError, "ttv_softmax='image'"),
        ("fastv", dict(positions="renumber"), ValueError, "original position ids, as in FastV's release"),
        ("fastv", dict(positions="original"), ValueError, "prunes inside the LLM"),
        ("fastv", dict(layer=4), ValueError, r"layer=4 is outside \[1, 3\]"),
        ("fastv", dict(query="all"), ValueError, "query='all'"),
    ],
)
def test_bad_schedules_are_clear_errors(llava4, method, options, error, fragment):
    model, _ = llava4
    with pytest.raises(error, match=fragment):
        vlm_prune.patch(model, method, 8, **options)
    assert vlm_prune.get_handle(model) is None


def test_layer_lengths_and_flops(llava4):
    model, processor = llava4
    inputs = llava_inputs(processor, PROMPTS[:1], SIZES[:1])
    length = inputs["input_ids"].shape[1]
    handle = vlm_prune.patch(model, "transition", 8, schedule=[(1, 32), (3, None)])
    logits(model, inputs)
    expected = stage_lengths(4, length - 64, 64, [(1, 32), (3, 8)])
    assert handle.layer_lengths == expected == [length, length - 32, length - 32, length - 56]
    cfg = model.config.text_config
    ratio = prefill_flops(cfg, length).ratio_to(prefill_flops(cfg, handle.layer_lengths))
    assert 1 < ratio < length / (length - 56)
    handle.remove()


def test_sdpa_stays_on(llava4):
    model, processor = llava4
    vlm_prune.patch(model, "transition", 8)
    logits(model, llava_inputs(processor, PROMPTS, SIZES))
    assert model.config.text_config._attn_implementation == "sdpa"
    vlm_prune.unpatch(model)
