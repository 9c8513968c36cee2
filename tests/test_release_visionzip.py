"""`visionzip` equals VisionZip's release (github dvlab-research/VisionZip @ 3151f6d, visionzip/utils.py
and clip_encoder.py), checked against a reference written here from the release's rules, with
none of vlm_prune's code: an eager copy of the vision tower, its [CLS] attention rows summed over
heads, the layer's keys averaged over heads, targets every (R // C)-th candidate, a contextual
token = target + mean of the others that joined it, merged before the projector, and the LLM
input [CLS], dominant (raster), contextual (target order)."""

from __future__ import annotations

import copy

import pytest
import torch

import vlm_prune
from vlm_prune import tiny

from .reference import reference_logits
from .test_families import _next_crop_layout, _qwen_attention_received, make_inputs, unpruned_positions


def release_tokens(hidden: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, k: int,
                   with_cls: bool = True) -> tuple[torch.Tensor, list[int], list[int]]:
    """One image (crop) by the release's rules.

    hidden: [T, Dv] the feature layer's output, [CLS] first when with_cls (else patches only);
    attention: [H, T] the [CLS] query's attention row per head (with_cls) or [T'] a score per
    patch; keys: [T, Dh] heads averaged. Returns (the tokens in the order the LLM gets them,
    dominant patch indices, target patch indices), patch indices counted without the [CLS]."""
    offset = 1 if with_cls else 0
    contextual = round(k * 10 / 64)
    dominant_count = k - contextual  # the [CLS] included
    scores = attention[:, offset:].sum(0) if with_cls else attention
    top = sorted((scores.topk(dominant_count - offset).indices + offset).tolist())
    keep = ([0] if with_cls else []) + top
    rest = [j for j in range(hidden.shape[0]) if j not in keep]
    step = max(1, len(rest) // contextual)
    target_at = list(range(0, len(rest), step))[:contextual]
    targets = [rest[p] for p in target_at]
    others = [rest[p] for p in range(len(rest)) if p not in target_at]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    joined = (unit[others] @ unit[targets].T).argmax(-1).tolist()
    merged = []
    for j, target in enumerate(targets):
        members = [o for o, t in zip(others, joined) if t == j]
        extra = hidden[members].mean(0) if members else torch.zeros_like(hidden[target])
        merged.append(hidden[target] + extra)
    tokens = torch.cat([hidden[keep], torch.stack(merged)])
    return tokens, [t - offset for t in top], [t - offset for t in targets]


def clip_signals(model, pixel_values):
    """Per crop: the feature layer's output [T, Dv] ([CLS] first), its [CLS] rows [H, T], its keys
    averaged over heads [T, Dh] -- from an eager copy of the tower."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
        n_layers = len(out.attentions)
        produced_by = model.config.vision_feature_layer % (n_layers + 1) - 1
        layer = tower.vision_model.encoder.layers[produced_by] if hasattr(tower, "vision_model") else \
            tower.encoder.layers[produced_by]
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[produced_by]))
    heads = model.config.vision_config.num_attention_heads
    keys = keys.view(*keys.shape[:2], heads, -1).mean(2)
    return out.hidden_states[model.config.vision_feature_layer], out.attentions[produced_by][:, :, 0], keys


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny.llava(seed=3)
    yield model, processor
    vlm_prune.unpatch(model)


@pytest.mark.parametrize("k", [20, 12])
def test_llava_equals_the_release(llava, k):
    model, processor = llava
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    inputs = processor(images=[tiny.random_image(150, 110, seed=4)], text=[prompt], return_tensors="pt")
    hidden, cls_rows, keys = clip_signals(model, inputs["pixel_values"])
    tokens, dominant, targets = release_tokens(hidden[0], cls_rows[0], keys[0], k)
    with torch.no_grad():
        features = model.model.multi_modal_projector(tokens)
    handle = vlm_prune.patch(model, "visionzip", k)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    kept = handle.kept_indices[0].tolist()
    assert len(kept) == k == handle.stats[0]["kept"]
    assert set(dominant) | set(targets) <= set(kept)  # the slots of what the tokens stand for
    # positions renumbered (LLaVA's and the release's): the kept slots only count
    expected = reference_logits(model, inputs["input_ids"][0], [features], [list(range(k))], "renumber")
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_raster_layout_under_original_positions(llava):
    """positions="original": no [CLS] (it has no position) and tokens at the patches they stand for;
    the merge is the release's."""
    model, processor = llava
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    inputs = processor(images=[tiny.random_image(150, 110, seed=4)], text=[prompt], return_tensors="pt")
    k = 20
    hidden, cls_rows, keys = clip_signals(model, inputs["pixel_values"])
    # no [CLS]: its slot goes to one more dominant patch, scored by the same [CLS] row
    tokens, dominant, targets = release_tokens(hidden[0, 1:], cls_rows[0, :, 1:].sum(0), keys[0, 1:], k,
                                               with_cls=False)
    slots = dominant + targets
    order = sorted(range(k), key=lambda i: slots[i])
    with torch.no_grad():
        features = model.model.multi_modal_projector(tokens[order])
    handle = vlm_prune.patch(model, "visionzip", k, positions="original")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    assert handle.kept_indices[0].tolist() == sorted(slots)
    expected = reference_logits(model, inputs["input_ids"][0], [features], [sorted(slots)], "original")
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layout='release'.*positions='original'"):
        vlm_prune.patch(model, "visionzip", k, positions="original", layout="release")


def test_llava_next_runs_the_release_on_each_crop():
    """LLaVA-NeXT: every crop, the base image too, keeps k tokens: its [CLS] feature, its dominant
    patches and contextual tokens by the release's rules, over the crop's tokens that the model's
    unpadding keeps; the base image's tokens equal the release's in order."""
    model, processor = tiny.llava_next(seed=5)
    inputs = make_inputs(processor, "llava_next", [(280, 196)], ["What is it?"])
    layout, n_crops = _next_crop_layout(model, inputs)
    hidden, cls_rows, keys = clip_signals(model, inputs["pixel_values"][0, :n_crops])
    k = 7
    handle = vlm_prune.patch(model, "visionzip", k)
    with torch.no_grad():
        out = model.model(**{key: v for key, v in inputs.items()})
    kept = set(handle.kept_indices[0].tolist())
    newlines = {i for i, where in enumerate(layout) if where is None}
    assert handle.stats[0]["kept"] == len(kept) == k * n_crops + len(newlines)
    assert newlines <= kept
    for crop in range(n_crops):
        slots = [i for i, where in enumerate(layout) if where is not None and where[0] == crop]
        patch_of = {layout[i][1]: i for i in slots}  # crop patch index -> packed slot
        present = sorted(patch_of)
        rows = [0] + [p + 1 for p in present]  # the crop's [CLS] and its tokens left by the unpadding
        tokens, dominant, targets = release_tokens(hidden[crop, rows], cls_rows[crop][:, rows], keys[crop, rows], k)
        stands_for = {slots[j] for j in dominant + targets}
        crop_kept = kept & set(slots)
        assert len(crop_kept) == k and stands_for <= crop_kept
        if crop == 0:  # the base image: the first side^2 slots, unpadded never
            with torch.no_grad():
                expected = model.model.multi_modal_projector(tokens)
            image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
            embeds = _inputs_embeds_seen(model, inputs)
            torch.testing.assert_close(embeds[0, image[0]:image[0] + k], expected, rtol=1e-5, atol=1e-5)
    handle.remove()


def _inputs_embeds_seen(model, inputs):
    """The inputs_embeds the patched language model receives."""
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen["embeds"]


def test_qwen_without_cls_in_raster_order():
    """Qwen2-VL has no [CLS]: dominant patches by the attention each token receives (the project's
    [CLS]-free score), contextual tokens by the last block's keys averaged over heads, in the LLM
    space (after the merger), at the original M-RoPE positions of what they stand for."""
    model, processor = tiny.qwen2_vl(seed=6)
    inputs = make_inputs(processor, "qwen2_vl", [(280, 196)], ["What is it?"])
    scores = _qwen_attention_received(model, inputs)
    attn = model.model.visual.blocks[-1].attn
    seen = {}
    hooks = [attn.qkv.register_forward_hook(lambda m, a, out: seen.update(qkv=out))]
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                  return_dict=True).pooler_output[0]
    hooks[0].remove()
    qkv = seen["qkv"]
    keys = qkv.reshape(qkv.shape[0], 3, attn.num_heads, -1)[:, 1].mean(1)  # [T, Dh]
    keys = keys.view(-1, 4, keys.shape[-1]).mean(1)  # per merged token (2x2 units, raster order)
    k = 13
    tokens, dominant, targets = release_tokens(features, scores, keys, k, with_cls=False)
    slots = dominant + targets
    order = sorted(range(k), key=lambda i: slots[i])
    handle = vlm_prune.patch(model, "visionzip", k)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    assert handle.kept_indices[0].tolist() == sorted(slots)
    expected = reference_logits(model, inputs["input_ids"][0], [tokens[order]], [sorted(slots)], "original",
                                unpruned_positions(model, inputs))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_counts_follow_the_release():
    """54 + 10 at 64 (the [CLS] among the 54), and the same share at other budgets."""
    from vlm_prune.methods.visionzip import contextual_count

    assert [k - contextual_count(k) for k in (64, 128, 192)] == [54, 108, 162]
    assert [contextual_count(k) for k in (64, 128, 192)] == [10, 20, 30]
