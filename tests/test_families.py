"""The contracts of DESIGN.md for LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL (tiny models, odd grids)."""

from __future__ import annotations

import copy

import pytest
import torch

import vlm_prune
from vlm_prune import tiny

from .reference import reference_logits

SIZES = [(280, 196), (100, 300)]  # non-square; Qwen grids 14x20 / 22x8 patches, NeXT 2x2 / 1x3 crops
QUESTIONS = ["What is it?", "How many green triangles are there in the picture?"]
METHODS = [("cls_attention", {}), ("random", {"seed": 1}), ("pool", {"mode": "subsample"})]
FAMILIES = ["llava_next", "qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def models():
    built = {
        "llava_next": tiny.llava_next(),
        "qwen2_vl": tiny.qwen2_vl(version="2"),
        "qwen2_5_vl": tiny.qwen2_vl(version="2.5"),
    }
    yield built
    for model, _ in built.values():
        vlm_prune.unpatch(model)


def prompt(family: str, question: str, n_images: int = 1) -> str:
    if family == "llava_next":
        return "USER: " + "<image>" * n_images + f"\n{question} ASSISTANT:"
    return tiny.qwen_prompt(question, n_images)


# every family, for the tests of usage modes (offload, generate modes, dtypes, grad modes)
BUILD = {
    "llava": lambda **kw: tiny.llava(image_size=112, **kw),
    "llava_next": tiny.llava_next,
    "qwen2_vl": lambda **kw: tiny.qwen2_vl(version="2", **kw),
    "qwen2_5_vl": lambda **kw: tiny.qwen2_vl(version="2.5", **kw),
}


def two_prompts(family, processor):
    """A padded batch of two prompts, one image each, of different sizes (so different token
    counts on every family but LLaVA-1.5)."""
    if family == "llava":
        images = [tiny.random_image(64, 48, seed=0), tiny.random_image(48, 64, seed=1)]
        texts = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nHow many shapes are there? ASSISTANT:"]
        return processor(images=images, text=texts, return_tensors="pt", padding=True)
    return make_inputs(processor, family, [(280, 196), (100, 300)], ["What is it?", "How many shapes are there?"])


def make_inputs(processor, family, sizes, questions, seeds=None, per_row=None):
    seeds = seeds if seeds is not None else list(range(len(sizes)))
    per_row = per_row or [1] * len(questions)
    images = [tiny.random_image(w, h, seed=s) for (w, h), s in zip(sizes, seeds)]
    texts = [prompt(family, q, n) for q, n in zip(questions, per_row)]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, **kw)


def image_features(model, inputs):
    inner = model.model
    with torch.no_grad():
        if "image_grid_thw" in inputs:
            out = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        else:
            out = inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    return list(out.pooler_output)


def unpruned_positions(model, inputs, row=0):
    """The unpruned model's position ids for one unpadded row: [L] or [3, L] (M-RoPE)."""
    if "mm_token_type_ids" not in inputs:
        return None
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    return positions[:, row]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, options", METHODS)
def test_keep_all_gives_identical_logits(models, family, method, options):
    model, processor = models[family]
    inputs = make_inputs(processor, family, SIZES, QUESTIONS)
    expected = logits(model, inputs)
    handle = vlm_prune.patch(model, method, 1.0, **options)
    try:
        assert torch.equal(logits(model, inputs), expected)
        assert all(s["kept"] == s["visual_tokens"] > 0 for s in handle.stats)
    finally:
        handle.remove()


@pytest.mark.parametrize("family, positions", [
    ("llava_next", "renumber"), ("llava_next", "original"), ("qwen2_vl", "original"), ("qwen2_5_vl", "original"),
])
@pytest.mark.parametrize("method, options", METHODS)
def test_keep_k_equals_the_language_model_on_the_kept_tokens(models, family, positions, method, options):
    model, processor = models[family]
    inputs = make_inputs(processor, family, SIZES[:1], QUESTIONS[1:])
    feats = image_features(model, inputs)[0]
    handle = vlm_prune.patch(model, method, 0.3, positions=positions, **options)
    try:
        out = logits(model, inputs)[0]
        kept = handle.kept_indices[0].tolist()
        n_visual = handle.stats[0]["visual_tokens"]
        assert kept == sorted(set(kept)) and len(kept) == handle.stats[0]["kept"] < n_visual
        expected = reference_logits(model, inputs["input_ids"][0], [feats[kept]], [kept], positions,
                                    unpruned_positions(model, inputs))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, options", METHODS)
def test_generate_with_cache_equals_without(models, family, method, options):
    model, processor = models[family]
    inputs = make_inputs(processor, family, SIZES, QUESTIONS)
    handle = vlm_prune.patch(model, method, 0.25, **options)
    try:
        with_cache = greedy(model, inputs)
        stats = handle.stats
        assert all(s["kept"] < s["visual_tokens"] for s in stats)
        assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
        assert handle.stats == stats
        first = with_cache[:, inputs["input_ids"].shape[1]]
        assert torch.equal(first, logits(model, inputs)[:, -1].argmax(-1))
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_samples_one_by_one(models, family):
    """Two samples with different image sizes (so different token counts) and prompt lengths."""
    model, processor = models[family]
    batch = make_inputs(processor, family, SIZES, QUESTIONS)
    handle = vlm_prune.patch(model, "cls_attention", 0.2)
    try:
        batch_logits = logits(model, batch)[:, -1]
        batch_gen = greedy(model, batch)[:, -5:]
        kept = [s["kept"] for s in handle.stats]
        for row in range(2):
            single = make_inputs(processor, family, SIZES[row:row + 1], QUESTIONS[row:row + 1], seeds=[row])
            torch.testing.assert_close(logits(model, single)[0, -1], batch_logits[row], rtol=1e-4, atol=1e-5)
            assert handle.stats[0]["kept"] == kept[row]
            assert torch.equal(greedy(model, single)[0, -5:], batch_gen[row])
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_image_prompt_and_unpatch(models, family):
    model, processor = models[family]
    inputs = make_inputs(processor, family, [(280, 196), (120, 90)], ["Compare the two pictures."], per_row=[2])
    expected = logits(model, inputs)
    handle = vlm_prune.patch(model, "pool", 0.5, mode="avg")
    out = logits(model, inputs)
    assert len(handle.kept_indices) == 2 and out.shape[1] < expected.shape[1]
    assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))
    vlm_prune.unpatch(model)
    assert torch.equal(logits(model, inputs), expected)


@pytest.mark.parametrize("family", ["llava", *FAMILIES])
@pytest.mark.parametrize("method", ["cls_attention", "transition"])
def test_a_deep_copy_runs_its_own_weights_under_its_own_patch(family, method):
    """copy.deepcopy of a patched model: every hook, wrapper and the handle of the copy belong
    to the copy (its generate() ran the original model, its encoder recorded into the
    original's patch). With the copy's lm_head doubled, its pruned logits and its generate()
    are the original's doubled, and unpatching the copy leaves the original pruning."""
    model, processor = BUILD[family](text_layers=4)
    inputs = two_prompts(family, processor)
    unpruned = logits(model, inputs)
    with vlm_prune.pruned(model, method, 0.25) as handle:
        want = logits(model, inputs)
        clone = copy.deepcopy(model)
        copied = vlm_prune.get_handle(clone)
        assert copied is not handle and copied.active and handle.active
        with torch.no_grad():
            clone.lm_head.weight.mul_(2.0)
            generated = clone.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True)
        got = logits(clone, inputs)
        torch.testing.assert_close(got, 2 * want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(generated.logits[0], got[:, -1], rtol=1e-4, atol=1e-4)
        vlm_prune.unpatch(clone)
        assert torch.equal(logits(model, inputs), want)
    torch.testing.assert_close(logits(clone, inputs), 2 * unpruned, rtol=1e-4, atol=1e-4)


# -- LLaVA-NeXT specifics ------------------------------------------------------------------------


def _next_crop_layout(model, inputs):
    """For one image: per packed token, (crop, token) it came from or None for image_newline,
    found by exact feature equality with the per-crop features (independent of pack_image_features)."""
    inner = model.model
    n_crops = [p.shape[0] for p in inputs["pixel_values"]][0]
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    n_crops = image_size_to_num_patches(inputs["image_sizes"][0], model.config.image_grid_pinpoints,
                                        model.config.vision_config.image_size)
    crops = inputs["pixel_values"][0, :n_crops]
    with torch.no_grad():
        hidden = inner.vision_tower(crops, output_hidden_states=True).hidden_states[-2][:, 1:]
        crop_feats = inner.multi_modal_projector(hidden)
    packed = image_features(model, inputs)[0]
    layout = []
    for token in packed:
        match = (crop_feats == token).all(-1).nonzero()
        layout.append(tuple(match[0].tolist()) if len(match) else None)
    return layout, n_crops


def test_llava_next_per_crop_scores_follow_the_packing(models):
    """budget="per_crop": in each crop (and the base image) the kept tokens are the top-k by that
    crop's own eager [CLS] attention; image_newline tokens are all kept."""
    model, processor = models["llava_next"]
    inputs = make_inputs(processor, "llava_next", SIZES[:1], QUESTIONS[:1])
    layout, n_crops = _next_crop_layout(model, inputs)
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        attn = tower(inputs["pixel_values"][0, :n_crops], output_attentions=True).attentions
    scores = attn[len(attn) - 2][:, :, 0, 1:].mean(1)  # layer producing hidden_states[-2]
    k = 3
    handle = vlm_prune.patch(model, "cls_attention", k, budget="per_crop")
    try:
        logits(model, inputs)
        kept = set(handle.kept_indices[0].tolist())
    finally:
        handle.remove()
    expected = {i for i, where in enumerate(layout) if where is None}  # newlines
    for crop in range(n_crops):
        slots = [i for i, where in enumerate(layout) if where is not None and where[0] == crop]
        ranked = sorted(slots, key=lambda i: -float(scores[crop, layout[i][1]]))
        expected |= set(ranked[:k])
    assert kept == expected
    assert handle.stats[0]["kept"] == len(expected) == k * n_crops + sum(w is None for w in layout)


def test_llava_next_per_image_budget_counts_the_whole_image(models):
    model, processor = models["llava_next"]
    inputs = make_inputs(processor, "llava_next", SIZES[:1], QUESTIONS[:1])
    layout, _ = _next_crop_layout(model, inputs)
    newlines = sum(w is None for w in layout)
    handle = vlm_prune.patch(model, "random", 0.25)
    try:
        logits(model, inputs)
        patches = len(layout) - newlines
        assert handle.stats[0]["kept"] == round(0.25 * patches) + newlines
    finally:
        handle.remove()


@pytest.mark.parametrize("method, keep, options", [
    ("cls_attention", 0.25, {}), ("pool", 0.3, {"budget": "per_crop"}), ("dct", 5, {"budget": "per_crop"}),
    ("visionzip", 0.2, {}), ("divprune", 0.2, {}),
])
def test_llava_next_kept_count_is_known_from_the_image_size(models, method, keep, options):
    """What the vLLM plugin reserves before the encoder runs: the layout of an image size alone
    (transformers' packing called with the config only) and `passed_on_count` give the count the
    patched model keeps, for wide, tall and square anyres grids."""
    from vlm_prune.patches.image_tokens import passed_on_count
    from vlm_prune.patches.adapters.llava_next import PackedLayout
    from vlm_prune.registry import get_method

    model, processor = models["llava_next"]
    handle = vlm_prune.patch(model, method, keep, **options)
    try:
        budget = handle._patch.budget  # the method's default where none is given (visionzip: per crop)
        for size in [(280, 196), (100, 300), (250, 90), (56, 56), (400, 130)]:
            inputs = make_inputs(processor, "llava_next", [size], QUESTIONS[:1])
            logits(model, inputs)
            alone = PackedLayout.of(model.config, inputs["image_sizes"], budget, "cpu")
            own = PackedLayout.of(model.config, inputs["image_sizes"], budget, "cpu", pack=model.model.pack_image_features)
            assert all(torch.equal(alone.rows[c], own.rows[c]) for c in (False, True))
            n_tokens = handle.stats[0]["visual_tokens"]
            assert alone.lengths == [n_tokens]
            counted = passed_on_count(get_method(method)(), handle._patch.run_config, alone.regions[0], n_tokens, budget)
            assert counted == handle.stats[0]["kept"] < n_tokens, size
    finally:
        handle.remove()


# -- Qwen specifics ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_rejects_renumbering(models, family):
    model, _ = models[family]
    with pytest.raises(ValueError, match=r"positions='renumber' is not supported.*\['original'\]"):
        vlm_prune.patch(model, "cls_attention", 0.5, positions="renumber")
    assert vlm_prune.get_handle(model) is None


def _qwen_attention_received(model, inputs):
    """Per merged token, raster order: mean attention received in the last vision block, by
    hand (full softmax, eager math), window order undone by matching merger outputs."""
    visual = model.model.visual
    attn = visual.blocks[-1].attn
    seen = {}
    hooks = [
        attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0], **kw), with_kwargs=True),
        visual.merger.register_forward_hook(lambda m, a, out: seen.update(merged=out)),
    ]
    try:
        raster = torch.cat(image_features(model, inputs))
    finally:
        for h in hooks:
            h.remove()
    module = __import__(type(attn).__module__, fromlist=["apply_rotary_pos_emb_vision"])
    with torch.no_grad():
        x = seen["x"]
        q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = module.apply_rotary_pos_emb_vision(q, k, *seen["position_embeddings"])
        received = torch.zeros(x.shape[0])
        bounds = seen["cu_seqlens"].tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            a = torch.softmax(torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]).float() * attn.scaling, -1)
            received[s:e] = a.mean(dim=(0, 1))
    units = received.view(-1, 4).mean(-1)
    order = [int((raster == row).all(-1).nonzero()[0]) for row in seen["merged"]]
    out = torch.empty_like(units)
    out[torch.tensor(order)] = units
    return out


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_cls_fallback_equals_attention_received_by_hand(models, family):
    model, processor = models[family]
    inputs = make_inputs(processor, family, SIZES, QUESTIONS)
    scores = _qwen_attention_received(model, inputs)
    counts = [int(t * h * w) // 4 for t, h, w in inputs["image_grid_thw"].tolist()]
    handle = vlm_prune.patch(model, "cls_attention", 7)
    try:
        logits(model, inputs)
        for image, image_scores in enumerate(scores.split(counts)):
            expected = sorted(image_scores.topk(7).indices.tolist())
            assert handle.kept_indices[image].tolist() == expected
    finally:
        handle.remove()


def test_qwen_decode_continues_the_unpruned_numbering(models):
    """A manual decode loop without position ids (the model numbers new tokens from rope_deltas)
    matches generate(), which tracks the unpruned positions itself."""
    model, processor = models["qwen2_vl"]
    inputs = make_inputs(processor, "qwen2_vl", SIZES[:1], QUESTIONS[:1])
    handle = vlm_prune.patch(model, "cls_attention", 0.25)
    try:
        expected = greedy(model, inputs)[0, -5:].tolist()
        with torch.no_grad():
            out = model(**inputs)
            tokens, cache = [int(out.logits[0, -1].argmax())], out.cache
            mask = inputs["attention_mask"]
            for _ in range(4):
                mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
                out = model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=mask, cache=cache)
                tokens.append(int(out.logits[0, -1].argmax()))
                cache = out.cache
        assert tokens == expected
    finally:
        handle.remove()


def test_qwen_video_passes_through_untouched(models):
    """Video tokens are never pruned: with an image and a video in one prompt, keep=1.0 is exact
    and keep<1 prunes the image only, with cache == no cache."""
    model, processor = models["qwen2_vl"]
    image_inputs = make_inputs(processor, "qwen2_vl", SIZES[:1], ["A picture and a clip."])
    video_grid = torch.tensor([[2, 4, 6]])  # 2 frames of 4x6 patches -> 2*2*3 = 12 video tokens
    n_video = int(video_grid.prod()) // 4
    video_token = model.config.video_token_id
    start, end = (tiny.tokenizer(320, tiny.QWEN_TOKENS).convert_tokens_to_ids(t)
                  for t in ("<|vision_start|>", "<|vision_end|>"))
    video_ids = torch.tensor([[start] + [video_token] * n_video + [end]])
    ids = torch.cat([video_ids, image_inputs["input_ids"]], dim=1)
    types = torch.cat([torch.tensor([[0] + [2] * n_video + [0]]), image_inputs["mm_token_type_ids"]], dim=1)
    torch.manual_seed(0)
    inputs = dict(image_inputs, input_ids=ids, mm_token_type_ids=types,
                  attention_mask=torch.ones_like(ids),
                  pixel_values_videos=torch.randn(int(video_grid.prod()), 3 * 2 * 14 * 14),
                  video_grid_thw=video_grid)
    expected = logits(model, inputs)
    handle = vlm_prune.patch(model, "cls_attention", 1.0)
    try:
        assert torch.equal(logits(model, inputs), expected)
        vlm_prune.patch(model, "cls_attention", 0.25)
        handle = vlm_prune.get_handle(model)
        out = logits(model, inputs)
        image_tokens = handle.stats[0]["visual_tokens"]
        assert out.shape[1] == ids.shape[1] - image_tokens + handle.stats[0]["kept"]
        assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))
    finally:
        vlm_prune.unpatch(model)
