"""A patched model keeps transformers' conventions (what transformers' own model tests check):
the output's fields and their order with labels, the vision tower's outputs, a loss with
`shift_labels`, static caches and compiled decoding on unpadded and right-padded batches,
assisted decoding on Qwen, `inputs_embeds`-only forwards, the model's own error for malformed
inputs, and a clear error for a model without the LM head. Each at keep=1.0 (equal to the
unpatched model) and at keep < 1 (works; equal to a reference where one applies)."""

from __future__ import annotations

import pytest
import torch

import vlm_prune
from vlm_prune import tiny

from .test_families import BUILD, make_inputs, two_prompts

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def models():
    built = {family: BUILD[family]() for family in FAMILIES}
    yield built
    for model, _ in built.values():
        vlm_prune.unpatch(model)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if hasattr(a, "to_tuple"):
        return type(a) is type(b) and list(a.keys()) == list(b.keys()) and all(
            _same(x, y) for x, y in zip(a.to_tuple(), b.to_tuple()))
    return type(a) is type(b)  # caches: the same kind


@pytest.mark.parametrize("method", ["cls_attention", "transition"])
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_with_labels_keep_their_fields_and_order(models, family, method):
    """`out[0]` / `to_tuple()[0]` is the loss, the fields come in the model's order, the tuple
    form too, and `image_outputs` holds the vision tower's output."""
    model, processor = models[family]
    inputs = two_prompts(family, processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        reference = model(**inputs, labels=labels)
        as_tuple = model(**inputs, labels=labels, return_dict=False)
    with vlm_prune.pruned(model, method, 1.0):
        with torch.no_grad():
            out = model(**inputs, labels=labels)
            out_tuple = model(**inputs, labels=labels, return_dict=False)
    assert list(out.keys()) == list(reference.keys())
    assert all(_same(a, b) for a, b in zip(out.to_tuple(), reference.to_tuple()))
    assert len(out_tuple) == len(as_tuple) and torch.equal(out_tuple[0], as_tuple[0])
    torch.testing.assert_close(out.image_outputs.pooler_output, reference.image_outputs.pooler_output,
                               rtol=0, atol=0)
    with vlm_prune.pruned(model, method, 0.3):
        with torch.no_grad():
            pruned = model(**inputs, labels=labels)
            pruned_tuple = model(**inputs, labels=labels, return_dict=False)
    assert list(pruned.keys()) == list(reference.keys()) and pruned[0] is pruned.loss
    assert torch.equal(pruned_tuple[0], pruned.loss) and len(pruned_tuple) == len(as_tuple)
    # the tower saw every token: its output is the unpruned model's
    for a, b in zip(pruned.image_outputs.pooler_output, reference.image_outputs.pooler_output):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_loss_honours_shift_labels(models, family):
    """Targets given per position (`shift_labels`, sequence / context-parallel training): the loss
    reads them, at keep=1.0 as unpatched, and pruned on the kept columns' targets."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    model, processor = models[family]
    inputs = make_inputs(processor, family, [(280, 196)], ["What is it?"]) if family != "llava" else \
        processor(images=[tiny.random_image(64, 48)], text=["USER: <image>\nWhat is it? ASSISTANT:"],
                  return_tensors="pt")
    labels = inputs["input_ids"].clone()
    shifted = torch.roll(labels, -1, dims=1)
    shifted[:, -1] = -100
    other = torch.full_like(shifted, -100)
    other[:, -4:] = shifted[:, -4:]
    with torch.no_grad():
        expected = [model(**inputs, labels=labels, shift_labels=s).loss for s in (shifted, other)]
    assert not torch.allclose(expected[0], expected[1])
    with vlm_prune.pruned(model, "cls_attention", 1.0):
        with torch.no_grad():
            got = [model(**inputs, labels=labels, shift_labels=s).loss for s in (shifted, other)]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with vlm_prune.pruned(model, "cls_attention", 0.3) as handle:
        with torch.no_grad():
            out = model(**inputs, labels=labels, shift_labels=other)
        kept_image = handle.kept_indices[0]
    is_image = inputs["input_ids"][0] == model.config.image_token_id
    keep = ~is_image
    keep[is_image.nonzero().flatten()[kept_image]] = True
    reference = ForCausalLMLoss(out.logits, labels[:, keep], model.config.text_config.vocab_size,
                                shift_labels=other[:, keep])
    torch.testing.assert_close(out.loss, reference)


@pytest.mark.parametrize("method", ["cls_attention", "transition"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_static_cache_on_an_unpadded_batch(models, family, method):
    """generate() prepares no mask for an unpadded batch ({'full_attention': None}); static and
    dynamic caches agree, pruned or not."""
    model, processor = models[family]
    inputs = make_inputs(processor, family, [(280, 196)], ["What is it?"])
    with torch.no_grad():
        unpatched = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                   cache_implementation="static")
    for keep in (1.0, 0.3):
        with vlm_prune.pruned(model, method, keep):
            with torch.no_grad():
                static = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                        cache_implementation="static")
                dynamic = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(static, dynamic)
        if keep == 1.0:
            assert torch.equal(static, unpatched)


def test_llava_next_static_cache_with_right_padding(models):
    """A right-padded batch on a static cache (the padding read from generate()'s 4D mask):
    equal to the dynamic cache pruned, and to the unpatched model at keep=1.0."""
    model, processor = models["llava_next"]
    processor.tokenizer.padding_side = "right"
    try:
        inputs = make_inputs(processor, "llava_next", [(280, 196), (100, 300)],
                             ["What is it?", "How many green triangles are there in the picture?"])
    finally:
        processor.tokenizer.padding_side = "left"
    assert bool((inputs["attention_mask"][:, -1] == 0).any())  # right padded
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad():
        unpatched = model.generate(**inputs, cache_implementation="static", **kw)
    for keep in (1.0, 0.3):
        with vlm_prune.pruned(model, "cls_attention", keep):
            with torch.no_grad():
                static = model.generate(**inputs, cache_implementation="static", **kw)
                dynamic = model.generate(**inputs, **kw)
        assert torch.equal(static, dynamic)
        if keep == 1.0:
            assert torch.equal(static, unpatched)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_assisted_decoding_equals_greedy(models, family):
    """The draft's candidates follow the prompt in the first forward, beyond mm_token_type_ids."""
    model, processor = models[family]
    draft, _ = BUILD[family](seed=1)
    inputs = make_inputs(processor, family, [(280, 196)], ["What is it?"])
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for keep in (1.0, 0.3):
        with vlm_prune.pruned(model, "cls_attention", keep):
            with torch.no_grad():
                greedy = model.generate(**inputs, **kw)
                assisted = model.generate(**inputs, assistant_model=draft, **kw)
        assert torch.equal(assisted, greedy)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_forward_from_inputs_embeds(models, family):
    """inputs_embeds without input_ids: the model numbers the tokens as text (0..L-1 on every
    axis); patched at keep=1.0 the same, pruned it keeps those positions of the kept tokens."""
    model, processor = models[family]
    inputs = make_inputs(processor, family, [(280, 196)], ["What is it?"])
    kw = dict(inputs)
    kw["inputs_embeds"] = model.model.get_input_embeddings()(kw.pop("input_ids"))
    model.model.rope_deltas = None  # (with them, from an earlier prompt, the model adds them: tested too)
    with torch.no_grad():
        reference = model(**kw).logits
    with vlm_prune.pruned(model, "cls_attention", 1.0):
        with torch.no_grad():
            assert torch.equal(model(**kw).logits, reference)
    with vlm_prune.pruned(model, "cls_attention", 0.3) as handle:
        with torch.no_grad():
            pruned = model(**kw).logits
        kept = handle.kept_indices[0]
    is_image = inputs["input_ids"][0] == model.config.image_token_id
    keep = ~is_image
    keep[is_image.nonzero().flatten()[kept]] = True
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                  return_dict=True).pooler_output[0]
        embeds = kw["inputs_embeds"][0].clone()
        embeds[is_image] = features
        positions = torch.arange(keep.shape[0])[keep].view(1, 1, -1).expand(3, 1, -1)
        hidden = model.model.language_model(inputs_embeds=embeds[keep][None], position_ids=positions).last_hidden_state
    torch.testing.assert_close(pruned, model.lm_head(hidden), rtol=1e-5, atol=1e-5)
    model.model.rope_deltas = torch.tensor([[7]])  # an earlier prompt's: the model adds them
    with torch.no_grad():
        reference = model(**kw).logits
    with vlm_prune.pruned(model, "cls_attention", 1.0):
        with torch.no_grad():
            assert torch.equal(model(**kw).logits, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_malformed_input_gets_the_models_own_error(models, family):
    """Fewer images than placeholders: the unpatched model's error, word for word."""
    model, processor = models[family]
    inputs = two_prompts(family, processor)
    bad = dict(inputs)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        first = int(inputs["image_grid_thw"][0].prod())
        bad["pixel_values"], bad["image_grid_thw"] = inputs["pixel_values"][first:], inputs["image_grid_thw"][1:]
    elif family == "llava_next":
        bad["pixel_values"], bad["image_sizes"] = inputs["pixel_values"][1:], inputs["image_sizes"][1:]
    else:
        bad["pixel_values"] = inputs["pixel_values"][1:]
    with pytest.raises(ValueError) as unpatched:
        with torch.no_grad():
            model(**bad)
    for keep in (1.0, 0.3):
        with vlm_prune.pruned(model, "cls_attention", keep):
            with pytest.raises(ValueError) as patched:
                with torch.no_grad():
                    model(**bad)
        assert str(patched.value) == str(unpatched.value)


def test_patching_the_inner_model_is_a_clear_error(models):
    model, _ = models["llava"]
    with pytest.raises(ValueError, match=r"takes the model with the language-model head.*LlavaModel is not one"):
        vlm_prune.patch(model.model, "cls_attention", 1.0)
    assert vlm_prune.get_handle(model.model) is None


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_without_token_types_does_what_the_model_does(models, family):
    """input_ids and images but no mm_token_type_ids: Qwen2.5-VL numbers the tokens as text,
    Qwen2-VL refuses -- patched, the same (its own error, or equal logits at keep=1.0)."""
    model, processor = models[family]
    inputs = make_inputs(processor, family, [(280, 196)], ["What is it?"])
    kw = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    model.model.rope_deltas = None
    try:
        with torch.no_grad():
            reference = model(**kw).logits
    except ValueError as error:
        with vlm_prune.pruned(model, "cls_attention", 0.3):
            with pytest.raises(ValueError) as patched:
                with torch.no_grad():
                    model(**kw)
        assert str(patched.value) == str(error) and family == "qwen2_vl"
        return
    assert family == "qwen2_5_vl"
    with vlm_prune.pruned(model, "cls_attention", 1.0):
        with torch.no_grad():
            assert torch.equal(model(**kw).logits, reference)
    with vlm_prune.pruned(model, "cls_attention", 0.3) as handle:
        with torch.no_grad():
            model(**kw)
        assert handle.stats[0]["kept"] < handle.stats[0]["visual_tokens"]
