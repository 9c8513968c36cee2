"""Qwen3-VL (and Qwen3-VL-MoE) with images: the contracts of guarantees.md, DeepStack included.

The tiny model's vision tower feeds two DeepStack levels (blocks 0 and 1), which the language
model adds to the image tokens' hidden states after decoder layers 0 and 1: every pruned token
set must reach those layers with its DeepStack features reduced the same way. The references
are built from the model's own pieces (its language model called with `visual_pos_masks` /
`deepstack_visual_embeds`, or the whole model given encoder outputs), with none of vlm_prune's
code paths."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import vlm_prune
from vlm_prune import tiny
from vlm_prune.config import PruneConfig
from vlm_prune.patches.image_tokens import follow_reduction
from vlm_prune.registry import get_method

from .test_families import _qwen_attention_received, greedy, logits
from .test_in_llm import masked_reference
from .test_release_dct import budget_grid, low_pass

SIZES = [(280, 196), (100, 300)]  # 6x9 and 9x3 merged tokens: odd grids
QUESTIONS = ["What is it?", "How many green triangles are there?"]
VISION = [("cls_attention", {}), ("random", {"seed": 1}), ("pool", {}), ("pool", {"mode": "subsample"}),
          ("pool", {"positions": "renumber"}), ("dct", {}), ("dct", {"positions": "original"}), ("visionzip", {}),
          ("divprune", {}), ("text_recovery", {}), ("text_recovery", {"mode": "fixed"})]
# stages after layer 1 (transition's default on 3 layers, its schedule below, fastv layer=1) drop
# tokens before DeepStack's last layer (1); fastv layer=2 after it
IN_LLM = [("transition", {}), ("transition", {"schedule": [(1, 0.5), (2, None)]}), ("fastv", {"layer": 1}),
          ("fastv", {"layer": 2, "query": "instruction"})]


@pytest.fixture(scope="module")
def models():
    built = {"qwen3_vl": tiny.qwen3_vl(), "qwen3_vl_moe": tiny.qwen3_vl(moe=True, seed=3)}
    yield built
    for model, _ in built.values():
        vlm_prune.unpatch(model)


def inputs_of(processor, rows=(0, 1)):
    images = [tiny.random_image(*SIZES[r], seed=r) for r in rows]
    return processor(images=images, text=[tiny.qwen_prompt(QUESTIONS[r]) for r in rows], return_tensors="pt",
                     padding=True)


def encoded(model, inputs):
    """The tower's output: (per image features [N_i, D], per level per image [N_i, D])."""
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    return list(out.pooler_output), [list(level) for level in out.deepstack_features]


def rope_positions(model, inputs):
    with torch.no_grad():
        return model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                          image_grid_thw=inputs["image_grid_thw"],
                                          attention_mask=inputs["attention_mask"])[0]


def language_model_reference(model, input_ids, kept, features, levels, positions, deepstack=True):
    """Logits [L', V] of the unpatched language model on one unpadded prompt whose image keeps the
    placeholders `kept` (indices into its run) with `features` [K, D] and DeepStack `levels`
    (each [K, D]), at position ids `positions` [3, L] of the unpruned prompt gathered at the kept
    columns."""
    is_image = input_ids == model.config.image_token_id
    first = int(is_image.nonzero()[0])
    keep = ~is_image
    keep[torch.tensor(kept) + first] = True
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(input_ids[keep]).clone()
        visual = is_image[keep]
        embeds[visual] = features.to(embeds.dtype)
        hidden = model.model.language_model(
            inputs_embeds=embeds[None], position_ids=positions[:, keep][:, None],
            attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long), use_cache=False,
            visual_pos_masks=visual[None] if deepstack else None,
            deepstack_visual_embeds=levels if deepstack else None).last_hidden_state
        return model.lm_head(hidden)[0]


# -- the contracts ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
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
        assert torch.equal(with_cache[:, inputs["input_ids"].shape[1]], pruned[:, -1].argmax(-1))
        assert not torch.allclose(pruned[:, -1], expected[:, -1], atol=1e-4)  # pruning changes the output
    finally:
        vlm_prune.unpatch(model)
    assert torch.equal(logits(model, inputs), expected)  # unpatch restores


@pytest.mark.parametrize("method, options", [("cls_attention", {}), ("pool", {}), ("dct", {}), ("visionzip", {}),
                                             ("text_recovery", {}), ("transition", {}), ("fastv", {"layer": 1})])
def test_padded_batch_equals_rows_alone(models, method, options):
    """Two prompts with images of different sizes (different token counts, left padding)."""
    model, processor = models["qwen3_vl"]
    batch = inputs_of(processor)
    assert_batch_equals_rows(model, batch, lambda row: inputs_of(processor, rows=(row,)), method, 0.3, options)


def assert_batch_equals_rows(model, batch, row_inputs, method, keep, options, generate=greedy):
    """A padded batch pruned by `method` equals each row alone: last logits, stats and 5 greedy
    tokens (`generate`). row_inputs(row): the inputs of that row alone."""
    handle = vlm_prune.patch(model, method, keep, **options)
    try:
        batch_last = logits(model, batch)[:, -1]
        batch_gen = generate(model, batch)[:, -5:]
        stats = [dict(s) for s in handle.stats]
        for row in range(len(stats)):
            single = row_inputs(row)
            torch.testing.assert_close(logits(model, single)[0, -1], batch_last[row], rtol=1e-4, atol=1e-5)
            assert handle.stats[0] == stats[row]
            assert torch.equal(generate(model, single)[0, -5:], batch_gen[row])
    finally:
        handle.remove()


def test_kept_tokens_keep_the_unpruned_positions(models):
    """positions="original" (the default): the language model gets the unpruned model's M-RoPE
    position ids of the columns kept, text included, on a padded batch."""
    model, processor = models["qwen3_vl"]
    inputs = inputs_of(processor)
    expected = rope_positions(model, inputs)
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(positions=kw["position_ids"], mask=kw["attention_mask"]), with_kwargs=True)
    handle = vlm_prune.patch(model, "cls_attention", 0.3)
    try:
        logits(model, inputs)
        columns = handle._patch.state.compaction.index  # [B, L'] the unpruned column of each slot, -1 = pad
    finally:
        handle.remove()
        hook.remove()
    for row in range(2):
        real = columns[row] >= 0
        assert torch.equal(seen["positions"][:, row, real], expected[:, row, columns[row, real]])
        assert torch.equal(seen["mask"][row, real], inputs["attention_mask"][row, columns[row, real]])
        assert not seen["mask"][row, ~real].bool().any()


def test_cls_attention_equals_the_language_model_on_the_kept_tokens_with_their_deepstack(models):
    """The kept tokens are the top-k by attention received (by hand), and the patched logits are
    the unpatched language model's on the kept tokens with their DeepStack features -- which
    matter: without them the logits differ."""
    model, processor = models["qwen3_vl"]
    inputs = inputs_of(processor, rows=(0,))
    features, levels = encoded(model, inputs)
    scores = _qwen_attention_received(model, inputs)
    k = 11
    handle = vlm_prune.patch(model, "cls_attention", k)
    try:
        out = logits(model, inputs)[0]
        kept = handle.kept_indices[0].tolist()
    finally:
        handle.remove()
    assert kept == sorted(scores.topk(k).indices.tolist())
    args = (model, inputs["input_ids"][0], kept, features[0][kept], [level[0][kept] for level in levels],
            rope_positions(model, inputs)[:, 0])
    torch.testing.assert_close(out, language_model_reference(*args), rtol=1e-5, atol=1e-5)
    assert (out - language_model_reference(*args, deepstack=False)).abs().max() > 1e-3


def test_pooled_tokens_get_their_deepstack_pooled_the_same_way(models):
    """pool (avg, original positions): a merged token's DeepStack features are the same cell
    averages of each level, at the position of the cell's centre token."""
    model, processor = models["qwen3_vl"]
    inputs = inputs_of(processor, rows=(0,))
    features, levels = encoded(model, inputs)
    (_, h, w), = (inputs["image_grid_thw"] // torch.tensor([1, 2, 2])).tolist()
    handle = vlm_prune.patch(model, "pool", 12)
    try:
        out = logits(model, inputs)[0]
        kept = handle.kept_indices[0].tolist()
    finally:
        handle.remove()
    rows, cols = budget_grid(12, h, w)

    def pooled(tokens):
        return F.adaptive_avg_pool2d(tokens.T.reshape(1, -1, h, w), (rows, cols)).reshape(-1, rows * cols).T


    def centres(size, cells):  # the centre token of each adaptive-pooling cell along one axis
        return [((i * size) // cells + -((-(i + 1) * size) // cells) - 1) // 2 for i in range(cells)]

    assert kept == [r * w + c for r in centres(h, rows) for c in centres(w, cols)]
    reference = language_model_reference(model, inputs["input_ids"][0], kept, pooled(features[0]),
                                         [pooled(level[0]) for level in levels], rope_positions(model, inputs)[:, 0])
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_dct_is_the_model_given_the_low_passed_features_and_deepstack_on_its_coarse_grid(models):
    """dct (its default positions="renumber"): the unpatched model given, as encoder outputs,
    the low-passed features and DeepStack levels (orthonormal DCT by hand) of a prompt with the
    coarse grid's placeholders and grid_thw -- numbered by the model itself."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    model, processor = models["qwen3_vl"]
    inputs = inputs_of(processor, rows=(0,))
    features, levels = encoded(model, inputs)
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
    encoder = BaseModelOutputWithDeepstackFeatures(
        pooler_output=(low_pass(features[0].view(h, w, -1), r, c),),
        deepstack_features=[(low_pass(level[0].view(h, w, -1), r, c),) for level in levels])
    with torch.no_grad():
        expected = model(input_ids=ids[keep_cols][None], mm_token_type_ids=types[keep_cols][None],
                         attention_mask=torch.ones(1, int(keep_cols.sum()), dtype=torch.long),
                         image_grid_thw=torch.tensor([[1, 2 * r, 2 * c]]),
                         mm_encoder_outputs={"image": encoder}).logits[0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, options", [("pool", {}), ("pool", {"mode": "subsample"}), ("dct", {}),
                                             ("visionzip", {}), ("divprune", {}), ("random", {"seed": 3}),
                                             ("text_recovery", {}), ("text_recovery", {"mode": "fixed"})])
def test_a_stream_follows_the_methods_decisions(method, options):
    """`follow_reduction` on random tokens: a selection takes the same rows; a method deciding
    from its signals alone gives the stream what it gives run on the stream; and for every
    method the stream is the output's derivative in its direction (decisions held)."""
    torch.manual_seed(0)
    n_images, h, w, dim, k = 2, 6, 9, 16, 20
    feats = torch.randn(n_images, h * w, dim, dtype=torch.float64)
    stream = torch.randn(n_images, h * w, dim, dtype=torch.float64)
    signals = {"cls_attention": torch.rand(n_images, h * w), "keys": torch.randn(n_images, h * w, 8),
               "question": torch.randn(n_images, dim)}
    instance = get_method(method)()
    config = PruneConfig.from_kwargs(method, k, **options)
    config = dataclasses.replace(config, options=instance.resolve_options(config.options, "original"))
    opts = config.options
    reduction = instance.reduce(feats, (h, w), k, signals, opts)
    got = follow_reduction(instance, config, reduction, feats, stream, (h, w), k, signals)
    flat = lambda x: x if isinstance(x, torch.Tensor) else torch.cat(list(x))  # noqa: E731
    if method in ("divprune", "random") or opts.get("mode") == "subsample":
        expected = stream.gather(1, reduction.index[..., None].expand(-1, -1, dim))
        assert torch.equal(got, expected)
    if method in ("pool", "dct", "visionzip") or (method == "text_recovery" and opts["mode"] == "adaptive"):
        again = instance.reduce(stream, (h, w), k, {**signals, "llm_features": feats}, opts).features
        torch.testing.assert_close(flat(got), flat(again), rtol=1e-12, atol=1e-12)
    eps = 1e-3  # the methods compute in float32
    moved = instance.reduce(feats + eps * stream, (h, w), k, signals, opts).features
    torch.testing.assert_close(flat(got), (flat(moved) - flat(reduction.features)) / eps, rtol=0, atol=2e-3)


# -- in-LLM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, options", [("fastv", {"layer": 1}),
                                             ("transition", {"schedule": [(1, 0.5), (2, None)]})])
def test_in_llm_equals_the_model_with_dropped_keys_masked(models, method, options):
    """A stage before DeepStack's last layer: the kept tokens get their own DeepStack features
    (sliced), as in the unpatched model whose dropped tokens are only masked."""
    model, processor = models["qwen3_vl"]
    inputs = inputs_of(processor)
    handle = vlm_prune.patch(model, method, 6, **options)
    try:
        out = logits(model, inputs)
        engine = handle._patch
        columns, starts = engine.stage_index, [stage.after_layer for stage in engine.stages]
        assert starts[0] < len(model.config.vision_config.deepstack_visual_indexes)
    finally:
        handle.remove()
    reference = masked_reference(model, inputs, columns, starts)
    final = columns[-1]
    for row in range(2):
        valid = (final[row] >= 0) & inputs["attention_mask"][row, final[row].clamp(min=0)].bool()
        torch.testing.assert_close(out[row, valid], reference[row, final[row, valid]], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, options, layer", [("fastv", {"layer": 2}, 1),
                                                    ("transition", {"schedule": [(2, None)]}, 2)])
def test_attention_rows_use_the_layers_q_k_norms(models, method, options, layer):
    """The attention rows a method scores with (fastv: layer K's own; transition: the stage's
    first layer on the unpruned sequence) equal the eager attention map of that layer, which
    applies Qwen3's per-head q/k RMS norms before RoPE."""
    model, processor = models["qwen3_vl"]
    assert_rows_are_the_eager_attention(model, inputs_of(processor), method, options, layer)


def assert_rows_are_the_eager_attention(model, inputs, method, options, map_index):
    """The attention rows `method` scores with (the prompt's last token for fastv, the
    instruction's rows for transition) equal the mean over heads of the eager attention map
    `map_index` the unpatched model returns (output_attentions=True)."""
    reference = copy.deepcopy(model)
    reference.model.language_model.set_attn_implementation("eager")
    with torch.no_grad():
        attention = reference(**inputs, output_attentions=True).attentions[map_index].mean(1)
    handle = vlm_prune.patch(model, method, 8, **options)
    try:
        logits(model, inputs)
        signal = handle._patch._attention
    finally:
        handle.remove()
    ids = inputs["input_ids"]
    is_image = ids == model.config.image_token_id
    for row in range(ids.shape[0]):
        real = inputs["attention_mask"][row].bool()
        if method == "fastv":
            rows = [ids.shape[1] - 1]
        else:
            last_image = int(is_image[row].nonzero().max())
            rows = [j for j in range(last_image + 1, ids.shape[1]) if real[j]]
        torch.testing.assert_close(signal[row], attention[row, rows].mean(0), rtol=1e-4, atol=1e-6)


# -- usage --------------------------------------------------------------------------------------


def test_a_deep_copy_prunes_with_its_own_deepstack_hooks(models):
    model, processor = models["qwen3_vl"]
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


@pytest.mark.parametrize("method", ["pool", "visionzip", "cls_attention"])
def test_inference_mode_and_autograd(models, method):
    """Under torch.inference_mode the DeepStack levels follow the reduction as under no_grad
    (forward-mode derivatives are off there); with autograd on, the loss reaches the DeepStack
    mergers through the reduced levels."""
    model, processor = models["qwen3_vl"]
    inputs = inputs_of(processor)
    with vlm_prune.pruned(model, method, 0.25):
        expected = logits(model, inputs)
        with torch.inference_mode():
            assert torch.equal(model(**inputs).logits, expected)
        model.zero_grad()
        model(**inputs).logits[:, -1].logsumexp(-1).sum().backward()
        merger = model.model.visual.deepstack_merger_list[-1]
        assert merger.linear_fc2.weight.grad is not None and merger.linear_fc2.weight.grad.abs().sum() > 0
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", ["pool", "fastv"])
def test_labels_and_inputs_embeds_at_keep_all(models, method):
    """A forward with labels, and one from inputs_embeds (the model numbers those as text), are
    the unpatched model's at keep=1.0; pruned, the loss is finite."""
    model, processor = models["qwen3_vl"]
    inputs = inputs_of(processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    embeds = dict(inputs, inputs_embeds=model.model.get_input_embeddings()(inputs["input_ids"]))
    del embeds["input_ids"]
    with torch.no_grad():
        model.model.rope_deltas = None
        expected = model(**inputs, labels=labels).loss, model(**embeds).logits
        with vlm_prune.pruned(model, method, 1.0):
            model.model.rope_deltas = None
            assert torch.equal(model(**inputs, labels=labels).loss, expected[0])
            assert torch.equal(model(**embeds).logits, expected[1])
        with vlm_prune.pruned(model, method, 0.25):
            assert torch.isfinite(model(**inputs, labels=labels).loss)


def test_static_cache_equals_the_dynamic_one(models):
    model, processor = models["qwen3_vl"]
    inputs = inputs_of(processor, rows=(0,))
    with vlm_prune.pruned(model, "visionzip", 0.25):
        assert torch.equal(greedy(model, inputs, cache_implementation="static"), greedy(model, inputs))


def test_the_offline_processor_of_a_checkpoint_folder(models, tmp_path):
    from vlm_prune.processors import qwen3_image_processor

    _, processor = models["qwen3_vl"]
    processor.tokenizer.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    loaded = qwen3_image_processor(str(tmp_path))
    expected, got = inputs_of(processor), inputs_of(loaded)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_registry():
    from vlm_prune.patches.adapters.qwen3_vl import Qwen3VLAdapter
    from vlm_prune.registry import FAMILIES, supported_model_types

    assert {"qwen3_vl", "qwen3_vl_moe"} <= set(supported_model_types())
    assert all(FAMILIES[t].endswith(":Qwen3VLAdapter") for t in Qwen3VLAdapter.model_types)
