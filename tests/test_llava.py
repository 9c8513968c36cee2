"""The contracts of DESIGN.md for LLaVA-1.5 with the vision-stage methods, on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlm_prune
from vlm_prune import tiny

from .conftest import llava_inputs
from .reference import eager_cls_scores, image_features, reference_logits, top_k_sorted

PROMPTS = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nHow many green triangles are there? ASSISTANT:"]
SIZES = [(140, 100), (90, 120)]
METHODS = [("cls_attention", {}), ("random", {"seed": 3}), ("pool", {"mode": "avg"}), ("pool", {"mode": "subsample"})]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6, **kw)


@pytest.mark.parametrize("method, options", METHODS)
def test_keep_all_gives_identical_logits(llava, method, options):
    model, processor = llava
    inputs = llava_inputs(processor, PROMPTS, SIZES)
    expected = logits(model, inputs)
    handle = vlm_prune.patch(model, method, 1.0, **options)
    assert torch.equal(logits(model, inputs), expected)
    assert handle.stats == [{"visual_tokens": 64, "kept": 64}] * 2


@pytest.mark.parametrize("positions", ["renumber", "original"])
@pytest.mark.parametrize("layers, eager_layers", [(None, [1]), ([-3, -2], [0, 1])])
def test_cls_attention_equals_eager_reference(llava, positions, layers, eager_layers):
    """FasterVLM (layer producing hidden_states[-2] = encoder layer 1 of 3) and a VTC-CLS ensemble."""
    model, processor = llava
    inputs = llava_inputs(processor, PROMPTS[1:], SIZES[1:])
    k = 13
    kept = top_k_sorted(eager_cls_scores(model, inputs["pixel_values"], eager_layers), k)
    feats = [f[kept[0]] for f in image_features(model, inputs["pixel_values"])]
    expected = reference_logits(model, inputs["input_ids"][0], feats, kept, positions)
    handle = vlm_prune.patch(model, "cls_attention", k, positions=positions, layers=layers)
    out = logits(model, inputs)[0]
    assert handle.kept_indices[0].tolist() == kept[0]
    assert handle.stats == [{"visual_tokens": 64, "kept": k}]
    assert out.shape == expected.shape == (inputs["input_ids"].shape[1] - 64 + k, model.config.text_config.vocab_size)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_random_and_pool_equal_reference(llava, positions):
    model, processor = llava
    inputs = llava_inputs(processor, PROMPTS[:1], SIZES[:1])
    ids, pixels = inputs["input_ids"][0], inputs["pixel_values"]
    feats = image_features(model, pixels)[0]

    handle = vlm_prune.patch(model, "random", 10, seed=5, positions=positions)
    out = logits(model, inputs)[0]
    kept = handle.kept_indices[0].tolist()
    assert len(kept) == 10 and kept == sorted(set(kept))
    torch.testing.assert_close(out, reference_logits(model, ids, [feats[kept]], [kept], positions), rtol=1e-5, atol=1e-5)

    handle = vlm_prune.patch(model, "pool", 16, mode="avg", positions=positions)
    out = logits(model, inputs)[0]
    pooled = F.avg_pool2d(feats.T.reshape(1, -1, 8, 8), 2).flatten(2)[0].T  # 8x8 -> 4x4 block means
    centres = [16 * r + 2 * c for r in range(4) for c in range(4)]
    assert handle.kept_indices[0].tolist() == centres
    torch.testing.assert_close(out, reference_logits(model, ids, [pooled], [centres], positions), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["renumber", "original"])
@pytest.mark.parametrize("method, options", METHODS[:3])
def test_generate_with_cache_equals_without(llava, method, options, positions):
    model, processor = llava
    inputs = llava_inputs(processor, PROMPTS, SIZES)
    handle = vlm_prune.patch(model, method, 9, positions=positions, **options)
    with_cache = greedy(model, inputs)
    assert [s["kept"] for s in handle.stats] == [9, 9]  # generate() really pruned
    without = greedy(model, inputs, use_cache=False)
    assert [s["kept"] for s in handle.stats] == [9, 9]
    assert torch.equal(with_cache, without)
    # the first generated token is the argmax of the pruned prefill
    assert torch.equal(with_cache[:, inputs["input_ids"].shape[1]], logits(model, inputs)[:, -1].argmax(-1))


@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_batch_equals_samples_one_by_one(llava, positions):
    """Different prompt lengths, image sizes and numbers of images per row (re-padding)."""
    model, processor = llava
    prompts = [PROMPTS[0], "USER: <image> <image>\nCompare the two pictures. ASSISTANT:", PROMPTS[1]]
    per_row_sizes = [[(140, 100)], [(90, 120), (60, 60)], [(200, 150)]]
    flat_sizes = [s for row in per_row_sizes for s in row]
    batch = llava_inputs(processor, prompts, flat_sizes)
    handle = vlm_prune.patch(model, "cls_attention", 7, positions=positions)
    batch_logits = logits(model, batch)[:, -1]
    assert [s["kept"] for s in handle.stats] == [7, 14, 7]
    batch_gen = greedy(model, batch)[:, -6:]
    seed = 0
    for row, (prompt, sizes) in enumerate(zip(prompts, per_row_sizes)):
        single = llava_inputs(processor, [prompt], sizes, seeds=list(range(seed, seed + len(sizes))))
        seed += len(sizes)
        torch.testing.assert_close(logits(model, single)[0, -1], batch_logits[row], rtol=1e-4, atol=1e-5)
        assert torch.equal(greedy(model, single)[0, -6:], batch_gen[row])


def test_unpatch_restores_and_other_instances_stay_untouched(llava):
    model, processor = llava
    twin, _ = tiny.llava(seed=0)
    inputs = llava_inputs(processor, PROMPTS, SIZES)
    expected = logits(model, inputs)
    handle = vlm_prune.patch(model, "cls_attention", 5)
    assert logits(model, inputs).shape[1] == expected.shape[1] - 59
    assert torch.equal(logits(twin, inputs), expected)  # same class, not patched
    assert vlm_prune.get_handle(twin) is None
    handle.remove()
    assert not handle.active and "generate" not in vars(model)
    assert torch.equal(logits(model, inputs), expected)
    assert torch.equal(greedy(model, inputs), greedy(twin, inputs))


def test_patching_twice_replaces_the_config(llava):
    model, processor = llava
    inputs = llava_inputs(processor, PROMPTS[:1], SIZES[:1])
    first = vlm_prune.patch(model, "pool", 16)
    second = vlm_prune.patch(model, "cls_attention", 4)
    assert not first.active and second.active and len(model.model._forward_pre_hooks) == 1
    logits(model, inputs)
    assert second.stats == [{"visual_tokens": 64, "kept": 4}]


def test_pruned_context_restores_the_previous_state(llava):
    model, processor = llava
    inputs = llava_inputs(processor, PROMPTS[:1], SIZES[:1])
    expected = logits(model, inputs)
    with vlm_prune.pruned(model, "random", 0.25) as handle:
        logits(model, inputs)
        assert handle.stats == [{"visual_tokens": 64, "kept": 16}]
    assert vlm_prune.get_handle(model) is None and torch.equal(logits(model, inputs), expected)
    outer = vlm_prune.patch(model, "pool", 4)
    with vlm_prune.pruned(model, "cls_attention", 8):
        pass
    assert vlm_prune.get_handle(model) is outer and outer.config.method == "pool"
    logits(model, inputs)
    assert outer.stats == [{"visual_tokens": 64, "kept": 4}]


def test_prompt_without_image_is_a_no_op(llava):
    model, processor = llava
    inputs = processor.tokenizer(["USER: Describe the picture in one word. ASSISTANT:"], return_tensors="pt")
    expected = logits(model, inputs)
    handle = vlm_prune.patch(model, "cls_attention", 4)
    assert torch.equal(logits(model, inputs), expected)
    assert handle.stats == [{"visual_tokens": 0, "kept": 0}]
    assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))


def test_vision_tower_keeps_sdpa(llava):
    model, processor = llava
    inputs = llava_inputs(processor, PROMPTS[:1], SIZES[:1])
    vlm_prune.patch(model, "cls_attention", 8, layers=[0, 1, 2])
    logits(model, inputs)
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"


def test_manual_decode_loop_uses_the_pruned_cache(llava):
    """A user-written decode loop (forward with cache, no position ids) matches generate()."""
    model, processor = llava
    inputs = llava_inputs(processor, PROMPTS[:1], SIZES[:1])
    vlm_prune.patch(model, "cls_attention", 6, positions="original")
    expected = greedy(model, inputs)[0, -6:].tolist()
    with torch.no_grad():
        out = model(**inputs)
        tokens, cache = [int(out.logits[0, -1].argmax())], out.cache
        for _ in range(5):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache)
            tokens.append(int(out.logits[0, -1].argmax()))
            cache = out.cache
    assert tokens == expected


def test_llava_1_5_shape_576_to_64(llava):
    """The real LLaVA-1.5 geometry: CLIP 336/14 -> 24x24 = 576 tokens, keep 64 (tiny widths)."""
    model, processor = tiny.llava(image_size=336, vision_layers=4)
    inputs = llava_inputs(processor, PROMPTS[:1], [(640, 480)])
    kept = top_k_sorted(eager_cls_scores(model, inputs["pixel_values"], [2]), 64)
    feats = image_features(model, inputs["pixel_values"])[0][kept[0]]
    expected = reference_logits(model, inputs["input_ids"][0], [feats], kept, "renumber")
    handle = vlm_prune.patch(model, "cls_attention", 64)
    torch.testing.assert_close(logits(model, inputs)[0], expected, rtol=1e-5, atol=1e-5)
    assert handle.stats == [{"visual_tokens": 576, "kept": 64}]


def test_features_encoded_before_patching(llava):
    """Features from an unpatched get_image_features carry no [CLS] signals: a clear error for
    cls_attention; methods that need no signals still prune them."""
    model, processor = llava
    inputs = llava_inputs(processor, PROMPTS[:1], SIZES[:1])
    with torch.no_grad():
        encoded = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    text_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
    vlm_prune.patch(model, "cls_attention", 8)
    with pytest.raises(ValueError, match=r"needs \['cls_attention'\].*pass pixel_values"):
        model(**text_inputs, mm_encoder_outputs={"image": encoded})
    handle = vlm_prune.patch(model, "pool", 16, mode="subsample")
    out = logits(model, {**text_inputs, "mm_encoder_outputs": {"image": encoded}})
    assert handle.stats == [{"visual_tokens": 64, "kept": 16}]
    assert torch.equal(out, logits(model, inputs))


def test_features_encoded_by_the_patched_model(llava):
    """get_image_features called by the user on a patched model returns what the unpatched one
    does (as a tuple too, return_dict=False); features it returned as an output object carry the
    signals, so a forward given them prunes as one given pixel_values."""
    model, processor = llava
    inputs = llava_inputs(processor, PROMPTS[:1], SIZES[:1])
    with torch.no_grad():
        plain = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=False)
    text_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
    handle = vlm_prune.patch(model, "cls_attention", 8)
    with torch.no_grad():
        as_tuple = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=False)
        encoded = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    assert isinstance(as_tuple, tuple) and all(torch.equal(a, b) for a, b in zip(as_tuple[1], plain[1]))
    out = logits(model, {**text_inputs, "mm_encoder_outputs": {"image": encoded}})
    assert handle.stats == [{"visual_tokens": 64, "kept": 8}]
    assert torch.equal(out, logits(model, inputs))


def test_generated_image_token_ids_stay_text(llava):
    """A model that emits the image token id: without a cache, later steps re-run the whole
    sequence and must treat generated tokens as text, as the cached run does."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model, processor = llava
    image_id = model.config.image_token_id

    class ForceImageToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] % 2 == 0:  # every other step
                scores = torch.full_like(scores, float("-inf"))
                scores[:, image_id] = 0.0
            return scores

    inputs = llava_inputs(processor, PROMPTS, SIZES)
    vlm_prune.patch(model, "cls_attention", 9)
    kw = dict(logits_processor=LogitsProcessorList([ForceImageToken()]))
    with_cache = greedy(model, inputs, **kw)
    assert (with_cache[:, inputs["input_ids"].shape[1]:] == image_id).any()
    assert torch.equal(with_cache, greedy(model, inputs, use_cache=False, **kw))
