"""Qwen3.5 (and Qwen3.5-MoE) with images: the contracts of guarantees.md on a hybrid decoder.

The tiny model's decoder is (full attention, Gated DeltaNet, full attention, Gated DeltaNet):
the recurrent layers keep a convolution window and a state instead of a KV cache. Vision-stage
methods give every layer a shorter prompt; in-LLM stages give the layers after them the kept
tokens only, which a recurrent layer must see as if the dropped ones had never been there (in
the cached prefill, in each replay of generate(use_cache=False), in a padded batch). Stages
that would need attention rows of a recurrent layer, or that start before the first
full-attention layer, are refused. References come from the unpatched model's own pieces."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vlm_prune
from vlm_prune import tiny

from .test_families import _qwen_attention_received, logits
from .test_qwen3_vl import assert_batch_equals_rows, assert_rows_are_the_eager_attention
from .test_release_dct import budget_grid, low_pass

SIZES = [(280, 196), (100, 300)]  # 6x9 and 9x3 merged tokens: odd grids
QUESTIONS = ["What is it?", "How many green triangles are there?"]
VISION = [("cls_attention", {}), ("random", {"seed": 1}), ("pool", {}), ("pool", {"mode": "subsample"}),
          ("pool", {"positions": "renumber"}), ("dct", {}), ("dct", {"positions": "original"}), ("visionzip", {}),
          ("divprune", {}), ("text_recovery", {}), ("text_recovery", {"mode": "fixed"})]
# the stages start after a full-attention layer (0 or 2) and read attention rows of full-attention
# layers only; recurrent layers 1 and 3 run on the kept tokens
IN_LLM = [("fastv", {"layer": 1}), ("fastv", {"layer": 1, "query": "instruction"}),
          ("transition", {"schedule": [(1, 0.5), (3, None)], "iga_layer": "own"}), ("transition", {"alpha": 1.0})]


@pytest.fixture(scope="module")
def models():
    built = {"qwen3_5": tiny.qwen3_5(), "qwen3_5_moe": tiny.qwen3_5(moe=True, seed=3)}
    for model, _ in built.values():
        # a checkpoint's <pad> has an embedding of its own (a tiny model's is zero, and zero inputs
        # leave a Gated DeltaNet's state untouched): padding must be masked, not neutral by luck
        with torch.no_grad():
            model.get_input_embeddings().weight[model.config.text_config.pad_token_id].normal_()
    yield built
    for model, _ in built.values():
        vlm_prune.unpatch(model)


def inputs_of(processor, rows=(0, 1)):
    images = [tiny.random_image(*SIZES[r], seed=r) for r in rows]
    return processor(images=images, text=[tiny.qwen_prompt(QUESTIONS[r]) for r in rows], return_tensors="pt",
                     padding=True)


def greedy(model, inputs, **kw):
    # a random model may emit <|image_pad|>, which a no-cache replay would take for an image slot
    suppress = [model.config.image_token_id, model.config.video_token_id]
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                              suppress_tokens=suppress, **kw)


def encoded(model, inputs):
    """The tower's output: per image features [N_i, D]."""
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    return list(out.pooler_output)


def rope_positions(model, inputs):
    with torch.no_grad():
        return model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                          image_grid_thw=inputs["image_grid_thw"],
                                          attention_mask=inputs["attention_mask"])[0]


def language_model_reference(model, input_ids, kept, features, positions):
    """Logits [L', V] of the unpatched language model on one unpadded prompt whose image keeps the
    placeholders `kept` (indices into its run) with `features` [K, D], at position ids
    `positions` [3, L] of the unpruned prompt gathered at the kept columns."""
    is_image = input_ids == model.config.image_token_id
    first = int(is_image.nonzero()[0])
    keep = ~is_image
    keep[torch.tensor(kept) + first] = True
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(input_ids[keep]).clone()
        embeds[is_image[keep]] = features.to(embeds.dtype)
        hidden = model.model.language_model(
            inputs_embeds=embeds[None], position_ids=positions[:, keep][:, None],
            attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long), use_cache=False).last_hidden_state
        return model.lm_head(hidden)[0]


def dropped_reference(model, inputs, stage_columns, stage_layers):
    """Logits [1, L', V] of the unpatched model on one unpadded prompt whose decoder layers from
    stage_layers[s] (0-based) on run on the prompt's columns stage_columns[s] ([L_s], each a
    subset of the previous) only, at their own positions: a recurrent layer there never sees
    the dropped tokens, a full-attention layer attends causally among the kept ones."""
    language_model = model.model.language_model
    held = {"columns": torch.arange(inputs["input_ids"].shape[1])}

    def hook(i, module, args, kwargs):
        if i not in stage_layers and i < stage_layers[0]:
            return None
        hidden = args[0]
        if i in stage_layers:
            new = stage_columns[stage_layers.index(i)]
            slots = torch.tensor([int((held["columns"] == c).nonzero()) for c in new.tolist()])
            hidden, held["columns"] = hidden[:, slots], new
        cols = held["columns"]
        cos, sin = kwargs["position_embeddings"]  # the whole prompt's
        kwargs = dict(kwargs, attention_mask=None, position_embeddings=(cos[:, cols], sin[:, cols]))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][:, cols]
        return (hidden, *args[1:]), kwargs

    handles = [layer.register_forward_pre_hook(partial(hook, i), with_kwargs=True)
               for i, layer in enumerate(language_model.layers)]
    try:
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


# -- the contracts ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
@pytest.mark.parametrize("method, options", VISION + IN_LLM)
def test_keep_all_is_identity_and_cache_equals_no_cache(models, family, method, options):
    model, processor = models[family]
    inputs = inputs_of(processor)
    expected = logits(model, inputs)
    handle = vlm_prune.patch(model, method, 1.0, **options)
    try:
        assert torch.equal(logits(model, inputs), expected)
        assert all(s["kept"] == s["visual_tokens"] > 0 for s in handle.stats)
        vlm_prune.patch(model, method, 0.25, **options)
        handle = vlm_prune.get_handle(model)
        with_cache = greedy(model, inputs)
        assert all(s["kept"] < s["visual_tokens"] for s in handle.stats)
        assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
        pruned = logits(model, inputs)
        assert not torch.allclose(pruned[:, -1], expected[:, -1], atol=1e-4)  # pruning changes the output
    finally:
        vlm_prune.unpatch(model)
    assert torch.equal(logits(model, inputs), expected)  # unpatch restores


@pytest.mark.parametrize("method, options", [("cls_attention", {}), ("pool", {}), ("dct", {}), ("visionzip", {}),
                                             ("text_recovery", {}), *IN_LLM[:3]])
def test_padded_batch_equals_rows_alone(models, method, options):
    """Two prompts with images of different sizes (different token counts, left padding; inside
    the decoder the in-LLM stages pad the row that keeps fewer tokens, before its real ones)."""
    model, processor = models["qwen3_5"]
    batch = inputs_of(processor)
    assert_batch_equals_rows(model, batch, lambda row: inputs_of(processor, rows=(row,)), method, 0.3, options,
                             generate=greedy)


def test_kept_tokens_keep_the_unpruned_positions(models):
    """positions="original" (the default): the language model gets the unpruned model's M-RoPE
    position ids of the columns kept, text included, on a padded batch; the vectorised index
    agreed with Qwen3.5's own get_rope_index on the first prompt."""
    model, processor = models["qwen3_5"]
    inputs = inputs_of(processor)
    expected = rope_positions(model, inputs)
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(positions=kw["position_ids"], mask=kw["attention_mask"]), with_kwargs=True)
    handle = vlm_prune.patch(model, "cls_attention", 0.3)
    try:
        logits(model, inputs)
        columns = handle._patch.state.compaction.index  # [B, L'] the unpruned column of each slot, -1 = pad
        assert handle._patch.adapter._fast_rope is True
    finally:
        handle.remove()
        hook.remove()
    for row in range(2):
        real = columns[row] >= 0
        assert torch.equal(seen["positions"][:, row, real], expected[:, row, columns[row, real]])
        assert torch.equal(seen["mask"][row, real], inputs["attention_mask"][row, columns[row, real]])
        assert not seen["mask"][row, ~real].bool().any()


def test_cls_attention_equals_the_language_model_on_the_kept_tokens(models):
    """The kept tokens are the top-k by attention received in the last vision block (by hand),
    and the patched logits are the unpatched language model's on the kept tokens."""
    model, processor = models["qwen3_5"]
    inputs = inputs_of(processor, rows=(0,))
    features = encoded(model, inputs)
    scores = _qwen_attention_received(model, inputs)
    k = 11
    handle = vlm_prune.patch(model, "cls_attention", k)
    try:
        out = logits(model, inputs)[0]
        kept = handle.kept_indices[0].tolist()
    finally:
        handle.remove()
    assert kept == sorted(scores.topk(k).indices.tolist())
    reference = language_model_reference(model, inputs["input_ids"][0], kept, features[0][kept],
                                         rope_positions(model, inputs)[:, 0])
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_pool_is_the_language_model_on_the_cell_averages(models):
    model, processor = models["qwen3_5"]
    inputs = inputs_of(processor, rows=(0,))
    features = encoded(model, inputs)
    (_, h, w), = (inputs["image_grid_thw"] // torch.tensor([1, 2, 2])).tolist()
    handle = vlm_prune.patch(model, "pool", 12)
    try:
        out = logits(model, inputs)[0]
        kept = handle.kept_indices[0].tolist()
    finally:
        handle.remove()
    rows, cols = budget_grid(12, h, w)
    pooled = F.adaptive_avg_pool2d(features[0].T.reshape(1, -1, h, w), (rows, cols)).reshape(-1, rows * cols).T
    reference = language_model_reference(model, inputs["input_ids"][0], kept, pooled,
                                         rope_positions(model, inputs)[:, 0])
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_dct_is_the_model_given_the_low_passed_features_on_its_coarse_grid(models):
    """dct (its default positions="renumber"): the unpatched model given, as encoder outputs, the
    low-passed features (orthonormal DCT by hand) of a prompt with the coarse grid's placeholders
    and grid_thw -- numbered by the model itself."""
    model, processor = models["qwen3_5"]
    inputs = inputs_of(processor, rows=(0,))
    features = encoded(model, inputs)
    (_, h, w), = (inputs["image_grid_thw"] // torch.tensor([1, 2, 2])).tolist()
    keep = 0.3
    r, c = budget_grid(round(keep * h * w), h, w)
    handle = vlm_prune.patch(model, "dct", keep)
    try:
        out = logits(model, inputs)[0]
    finally:
        handle.remove()
    ids, types = inputs["input_ids"][0], inputs["mm_token_type_ids"][0]
    image = ids == model.config.image_token_id
    first = int(image.nonzero()[0])
    keep_cols = ~image
    keep_cols[first:first + r * c] = True
    encoder = BaseModelOutputWithPooling(pooler_output=(low_pass(features[0].view(h, w, -1), r, c),))
    with torch.no_grad():
        model.model.rope_deltas = None
        expected = model(input_ids=ids[keep_cols][None], mm_token_type_ids=types[keep_cols][None],
                         attention_mask=torch.ones(1, int(keep_cols.sum()), dtype=torch.long),
                         image_grid_thw=torch.tensor([[1, 2 * r, 2 * c]]),
                         mm_encoder_outputs={"image": encoder}).logits[0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


# -- in-LLM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
@pytest.mark.parametrize("method, options", [IN_LLM[0], IN_LLM[2]])
def test_in_llm_equals_the_model_whose_later_layers_never_see_the_dropped_tokens(models, family, method, options):
    """After a stage the recurrent layers' convolution and state run over the kept tokens only:
    the unpatched model whose later layers are given the kept columns alone (by hand)."""
    model, processor = models[family]
    for row in range(2):
        inputs = inputs_of(processor, rows=(row,))
        handle = vlm_prune.patch(model, method, 6, **options)
        try:
            out = logits(model, inputs)
            engine = handle._patch
            columns, starts = [index[0] for index in engine.stage_index], [s.after_layer for s in engine.stages]
        finally:
            handle.remove()
        assert (columns[-1] >= 0).all() and len(columns[-1]) < inputs["input_ids"].shape[1]
        reference = dropped_reference(model, inputs, columns, starts)
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, options, full_layer", [
    ("fastv", {"layer": 1}, 0), ("fastv", {"layer": 3}, 1),
    ("transition", {"schedule": [(3, None)], "iga_layer": "own"}, 1)])
def test_attention_rows_are_the_gated_queries_with_q_k_norms(models, method, options, full_layer):
    """The attention rows a method scores with equal the eager attention map of that
    full-attention layer (Qwen3.5's q_proj holds each head's query and output gate; the
    queries and keys get per-head RMS norms before the partial RoPE). full_layer: the index of
    that layer among the full-attention layers (whose maps the model returns)."""
    model, processor = models["qwen3_5"]
    assert_rows_are_the_eager_attention(model, inputs_of(processor), method, options, full_layer)


@pytest.mark.parametrize("method, options, match", [
    ("fastv", {}, "attention rows of decoder layer 1, a linear-attention"),  # K=2: rows of layer 1
    ("transition", {}, "attention rows of decoder layer 1, a linear-attention"),  # IGA from stage layers 1, 2
    ("transition", {"schedule": [(2, None)], "iga_layer": "own"}, "decoder layer 1, a linear-attention"),
])
def test_in_llm_stages_that_need_a_recurrent_layers_attention_are_refused(models, method, options, match):
    """Refused at patch() time; nothing patched: a patch active before stays as it was."""
    model, processor = models["qwen3_5"]
    inputs = inputs_of(processor, rows=(0,))
    unpatched = logits(model, inputs)
    with pytest.raises(ValueError, match=match):
        vlm_prune.patch(model, method, 0.25, **options)
    assert vlm_prune.get_handle(model) is None and torch.equal(logits(model, inputs), unpatched)
    with vlm_prune.pruned(model, "pool", 0.25) as before:
        pooled = logits(model, inputs)
        with pytest.raises(ValueError, match="qwen3_5"):
            vlm_prune.patch(model, method, 0.25, **options)
        assert vlm_prune.get_handle(model) is before and torch.equal(logits(model, inputs), pooled)


def test_in_llm_stages_before_the_first_full_attention_layer_are_refused():
    """The first layer that keeps keys gives transformers the cache's length and the masks' sizes:
    it must hold every prompt token, so no stage may start at or before it."""
    model, processor = tiny.qwen3_5(layer_types=("linear_attention", "full_attention", "linear_attention"),
                                    vision_depth=1)
    for method, options in [("fastv", {"layer": 1}), ("transition", {"alpha": 1.0, "schedule": [(1, None)]})]:
        with pytest.raises(ValueError, match="first full-attention layer is 1"):
            vlm_prune.patch(model, method, 0.25, **options)
        assert vlm_prune.get_handle(model) is None
    inputs = inputs_of(processor, rows=(0,))
    with vlm_prune.pruned(model, "fastv", 0.25, layer=2):  # after layer 1, rows of layer 1: allowed
        assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))


# -- usage --------------------------------------------------------------------------------------


def test_a_deep_copy_prunes_on_its_own(models):
    model, processor = models["qwen3_5"]
    inputs = inputs_of(processor)
    for method, options in [("pool", {}), ("fastv", {"layer": 1})]:
        with vlm_prune.pruned(model, method, 0.25, **options):
            want = logits(model, inputs)
            clone = copy.deepcopy(model)
            with torch.no_grad():
                clone.lm_head.weight.mul_(2.0)
            torch.testing.assert_close(logits(clone, inputs), 2 * want, rtol=1e-4, atol=1e-4)
            vlm_prune.unpatch(clone)
            assert torch.equal(logits(model, inputs), want)


def test_registry():
    from vlm_prune.patches.adapters.qwen3_5 import Qwen3_5Adapter
    from vlm_prune.registry import FAMILIES, supported_model_types

    assert {"qwen3_5", "qwen3_5_moe"} <= set(supported_model_types())
    assert all(FAMILIES[t].endswith(":Qwen3_5Adapter") for t in Qwen3_5Adapter.model_types)
