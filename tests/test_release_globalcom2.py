"""`globalcom2` follows GlobalCom²'s release (github xuyang-liu16/GlobalCom2 @ 96b2d00,
llava/model/llava_arch.py), checked against a reference written here from its rules with plain
loops and none of vlm_prune's code:

- score: the last vision layer's [CLS] row before the softmax (q . k * scale), heads averaged;
- thumbnail: its int(side^2 r) best tokens, in descending score order;
- crop ratios: the thumbnail's scores summed per tile block (max(side // rows, 1) x
  max(side // cols, 1), the last block taking the rest), softmax(sums / 10),
  r (1 + p - mean p) clipped at 1, int(N_c * ratio) tokens of the crop's unpadded part;
- in a crop: L2-normalised own scores + L2-normalised thumbnail scores resized bilinearly
  (align_corners=False, by hand here) to the unpadded crop grid and cut per crop as the release
  walks it; top-k, raster order; the unpadding from the release's own mask rule.

Mutated rules (no thumbnail guidance, equal crop ratios, raster thumbnail, temperature 1,
softmax probabilities) must give other tokens, so the parity is not vacuous. End to end on a
tiny LLaVA-NeXT: the kept tokens and the logits are the rule's on [CLS] logits computed by hand;
keep=1.0 is the identity, keep < 1 changes the output, generate with a cache equals without;
LLaVA-1.5 and Qwen2-VL are refused at patch time with nothing patched; the vLLM plugin refuses it.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

import vlm_prune
import vlm_prune.methods.globalcom2  # noqa: F401  (registers "globalcom2")
from vlm_prune import tiny
from vlm_prune.config import PruneConfig
from vlm_prune.methods.globalcom2 import GlobalCom2

from .reference import reference_logits
from .test_families import greedy, logits, make_inputs, two_prompts

# -- the reference: the release's rules with loops ------------------------------------------------


def release_mask(tiles, side, size_hw):
    """[H][W] bool over the padded crop grid: the release's unpadding (compress_crops)."""
    rows, cols = tiles
    H, W = rows * side, cols * side
    height, width = size_hw
    mask = [[False] * W for _ in range(H)]
    if width / height > W / H:
        new_height = int(height * (W / width))
        pad = (H - new_height) // 2
        for y in range(pad, H - pad):
            mask[y] = [True] * W
    else:
        new_width = int(width * (H / height))
        pad = (W - new_width) // 2
        for y in range(H):
            for x in range(pad, W - pad):
                mask[y][x] = True
    return mask


def bilinear(grid, out_h, out_w):
    """PyTorch's bilinear resize with align_corners=False, by hand."""
    in_h, in_w = len(grid), len(grid[0])

    def source(d, n_in, n_out):
        x = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(x), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), x - i0

    out = []
    for y in range(out_h):
        y0, y1, ly = source(y, in_h, out_h)
        row = []
        for x in range(out_w):
            x0, x1, lx = source(x, in_w, out_w)
            top = grid[y0][x0] * (1 - lx) + grid[y0][x1] * lx
            bottom = grid[y1][x0] * (1 - lx) + grid[y1][x1] * lx
            row.append(top * (1 - ly) + bottom * ly)
        out.append(row)
    return out


def l2(values):
    norm = math.sqrt(sum(v * v for v in values))
    return [v / max(norm, 1e-12) for v in values]


def ref_globalcom2(base, crops, tiles, side, size_hw, ratio, temperature=10.0, mutation=None):
    """base: side*side thumbnail scores; crops: per crop (tile raster order) its side*side scores.
    Returns (thumbnail tokens in output order, [(crop 1-based, token)] kept in raster order over
    the padded grid, the padded grid's rows that hold tokens)."""
    rows, cols = tiles
    n_thumb = side * side
    by_score = sorted(range(n_thumb), key=lambda i: (-base[i], i))[:int(n_thumb * ratio)]
    thumb = sorted(by_score) if mutation == "raster_thumbnail" else by_score
    # the crops' ratios
    block_h, block_w = max(side // rows, 1), max(side // cols, 1)
    sums = [0.0] * (rows * cols)
    for idx in range(n_thumb):
        i, j = divmod(idx, side)
        sums[min(i // block_h, rows - 1) * cols + min(j // block_w, cols - 1)] += base[idx]
    t = 1.0 if mutation == "temperature_1" else temperature
    top = max(sums)
    exp = [math.exp((s - top) / t) for s in sums]
    p = [e / (sum(exp) + 1e-8) for e in exp]
    mean = sum(p) / len(p)
    scales = [min(ratio * (1 + q - mean), 1.0) for q in p]
    if mutation == "equal_ratios":
        scales = [ratio] * len(p)
    # the unpadded grid and each crop's part of it
    mask = release_mask(tiles, side, size_hw)
    live_rows = [y for y in range(rows * side) if any(mask[y])]
    live_cols = [x for x in range(cols * side) if any(mask[y][x] for y in range(rows * side))]
    cur_h, cur_w = live_rows[-1] - live_rows[0] + 1, live_cols[-1] - live_cols[0] + 1
    dims = []
    for ti in range(rows):
        for tj in range(cols):
            ys = [y for y in range(side) if any(mask[ti * side + y][tj * side + x] for x in range(side))]
            xs = [x for x in range(side) if any(mask[ti * side + y][tj * side + x] for y in range(side))]
            dims.append((len(xs), len(ys)) if ys else (0, 0))
    guide = bilinear([base[r * side:(r + 1) * side] for r in range(side)], cur_h, cur_w)
    parts, current_h = [], 0
    for ti in range(rows):
        current_w = 0
        for tj in range(cols):
            w, h = dims[ti * cols + tj]
            parts.append([guide[y][x] for y in range(current_h, current_h + h)
                          for x in range(current_w, current_w + w)])
            current_w += w
        current_h += dims[ti * cols][1]
    kept = set()
    for c in range(rows * cols):
        ti, tj = divmod(c, cols)
        valid = [t for t in range(n_thumb) if mask[ti * side + t // side][tj * side + t % side]]
        own = [crops[c][t] for t in valid]
        if mutation == "own_only":
            combined = own
        else:
            combined = [a + b for a, b in zip(l2(own), l2(parts[c]))]
        k = int(len(valid) * scales[c])
        for j in sorted(range(len(valid)), key=lambda j: (-combined[j], j))[:k]:
            kept.add((c + 1, valid[j]))
    order = []
    for y in range(rows * side):
        for x in range(cols * side):
            crop = (y // side) * cols + x // side + 1
            token = (y % side) * side + x % side
            if (crop, token) in kept:
                order.append((crop, token))
    return thumb, order, live_rows


# -- the engine on layouts without a model ------------------------------------------------------

LAYOUTS = {
    # LLaVA-NeXT-7B's: 24 x 24 tokens per crop, tiles 1x2, 2x1, 2x2, 3x1, 1x3
    24: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    # 5 x 5 tokens per crop: blocks that do not divide the thumbnail (5 // 2, 5 // 3)
    5: [[70, 140], [140, 70], [140, 210], [210, 210], [210, 70], [70, 210]],
}
SIZES = [(480, 640), (640, 480), (300, 1000), (1000, 300), (200, 210), (333, 777), (777, 333), (50, 400)]


def layout_config(side):
    from transformers import LlavaNextConfig

    return LlavaNextConfig(vision_config={"model_type": "clip_vision_model", "image_size": side * 14,
                                          "patch_size": 14},
                           image_grid_pinpoints=LAYOUTS[side], vision_feature_select_strategy="default")


def run_engine(side, size_hw, keep, scores, options=None, positions="renumber"):
    """Tokens passed on for one image whose per-crop [CLS] scores (incl. the [CLS] column) are
    `scores` [crops, 1 + T]: ids crop * T + token (-1: newline), in output order."""
    from patches.adapters.llava_next import PackedLayout
    from patches.image_tokens import reduce_image_tokens

    layout = PackedLayout.of(layout_config(side), [list(size_hw)], "per_crop", "cpu")
    n_crops, T = layout.crops[0], side * side
    ids = torch.zeros(n_crops, 1 + T, 2)
    ids[:, 1:, 0] = torch.arange(n_crops * T, dtype=torch.float32).view(n_crops, T)
    ids[0, 0, 0] = -1  # what the packing reads for a newline
    features = layout.pack(ids, after_cls=True)
    signals = {"cls_logits": scores, "cls_attention": scores.softmax(-1)}
    images = layout.images(features, signals)
    method = GlobalCom2()
    config = PruneConfig("globalcom2", keep, options=options or {})
    config = dataclasses.replace(config, options=method.resolve_options(config.options, positions))
    reduced = reduce_image_tokens(method, config, images, "per_crop")
    run_engine.packed = [int(v) for v in features[0][:, 0].tolist()]
    return [int(v) for v in reduced.features[0][:, 0].tolist()], layout.tiles[0], n_crops


def engine_vs_reference(side, size_hw, keep, seed, mutation=None, options=None):
    g = torch.Generator().manual_seed(seed)
    T = side * side
    from patches.adapters.llava_next import PackedLayout

    layout = PackedLayout.of(layout_config(side), [list(size_hw)], "per_crop", "cpu")
    scores = torch.randn(layout.crops[0], 1 + T, generator=g) * 3
    out, tiles, n_crops = run_engine(side, size_hw, keep, scores, options)
    thumb, kept, live_rows = ref_globalcom2(scores[0, 1:].tolist(), [s[1:].tolist() for s in scores[1:]], tiles,
                                            side, size_hw, keep, mutation=mutation)
    got_thumb = [i for i in out if 0 <= i < T]
    got_crops = [(i // T, i % T) for i in out if i >= T]
    newlines = sum(1 for i in out if i == -1)
    return (got_thumb, got_crops, newlines), (thumb, kept, len(live_rows)), out


@pytest.mark.parametrize("side", sorted(LAYOUTS))
@pytest.mark.parametrize("size_hw", SIZES)
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.1])
def test_parity_with_the_release(side, size_hw, keep):
    for seed in range(2):
        got, expected, out = engine_vs_reference(side, size_hw, keep, seed)
        assert got == expected
        # order: thumbnail (by score), then the crop grid row by row, each row closed by its newline
        assert out[:len(expected[0])] == expected[0]


def test_mutated_rules_differ():
    for mutation in ("own_only", "equal_ratios", "raster_thumbnail", "temperature_1"):
        differs = False
        for side in sorted(LAYOUTS):
            for size_hw in SIZES[:4]:
                got, expected, _ = engine_vs_reference(side, size_hw, 0.25, 0)
                _, mutated, _ = engine_vs_reference(side, size_hw, 0.25, 0, mutation=mutation)
                assert got == expected
                differs |= mutated != got
        assert differs, mutation


def test_softmax_score_differs_and_raster_layout():
    got, expected, _ = engine_vs_reference(24, (480, 640), 0.25, 0, options={"score": "softmax"})
    assert got != expected
    got, expected, out = engine_vs_reference(24, (480, 640), 0.25, 0, options={"layout": "raster"})
    assert got[1:] == expected[1:] and got[0] == sorted(expected[0]) != expected[0]


def test_int_keep_is_a_ratio_of_the_patch_tokens_and_full_keep_keeps_all():
    side, size_hw = 5, (333, 777)
    g = torch.Generator().manual_seed(0)
    from patches.adapters.llava_next import PackedLayout

    layout = PackedLayout.of(layout_config(side), [list(size_hw)], "per_crop", "cpu")
    scores = torch.randn(layout.crops[0], 1 + side * side, generator=g)
    patches = sum(r.size for r in layout.regions[0])
    everything, _, _ = run_engine(side, size_hw, 1.0, scores)
    assert everything == run_engine.packed and len(everything) == layout.lengths[0]
    assert run_engine(side, size_hw, patches, scores)[0] == everything
    assert run_engine(side, size_hw, patches // 2, scores)[0] == run_engine(side, size_hw, (patches // 2) / patches,
                                                                            scores)[0]


# -- end to end on a tiny LLaVA-NeXT ------------------------------------------------------------


@pytest.fixture(scope="module")
def next_model():
    model, processor = tiny.llava_next()
    yield model, processor
    vlm_prune.unpatch(model)


def hand_cls_logits(model, inputs):
    """[crops, T] the last vision layer's [CLS] row before the softmax, heads averaged, by hand."""
    tower = model.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[-1]
    seen = {}
    handle = layer.layer_norm1.register_forward_hook(lambda m, i, o: seen.update(x=o))
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    finally:
        handle.remove()
    attn = layer.self_attn
    x = seen["x"]
    heads = attn.num_heads
    q = attn.q_proj(x)[:, 0].view(x.shape[0], heads, -1)
    k = attn.k_proj(x).view(x.shape[0], x.shape[1], heads, -1)
    rows = torch.einsum("chd,cthd->cht", q, k) * attn.head_dim ** -0.5
    return rows.mean(1)[:, 1:].detach()


def test_end_to_end_kept_tokens_and_logits_follow_the_rules(next_model):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    model, processor = next_model
    vlm_prune.unpatch(model)
    for size_wh, keep in (((280, 196), 0.25), ((100, 300), 0.5)):
        inputs = make_inputs(processor, "llava_next", [size_wh], ["What is it?"])
        scores = hand_cls_logits(model, inputs)
        size_hw = inputs["image_sizes"][0].tolist()
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        tiles = get_anyres_image_grid_shape(size_hw, model.config.image_grid_pinpoints,
                                            model.config.vision_config.image_size)
        thumb, kept, live_rows = ref_globalcom2(scores[0].tolist(), [s.tolist() for s in scores[1:]], tiles, side,
                                                size_hw, keep)
        # packed positions: the base image, then the unpadded grid row by row, a newline after each
        T, position, slot_of, newline_slots = side * side, side * side, {}, []
        mask = release_mask(tiles, side, size_hw)
        for y in live_rows:
            for x in range(tiles[1] * side):
                if mask[y][x]:
                    slot_of[(y // side) * tiles[1] + x // side + 1, (y % side) * side + x % side] = position
                    position += 1
            newline_slots.append(position)
            position += 1
        rest = sorted([slot_of[c] for c in kept] + newline_slots)
        with torch.no_grad():
            feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                   return_dict=True).pooler_output[0]
        assert feats.shape[0] == position
        expected = reference_logits(model, inputs["input_ids"][0], [torch.cat([feats[thumb], feats[rest]])],
                                    [sorted(thumb) + rest], "renumber")
        with vlm_prune.pruned(model, "globalcom2", keep) as handle:
            out = logits(model, inputs)[0]
            assert handle.kept_indices[0].tolist() == sorted(thumb) + rest
            assert handle.stats == [{"visual_tokens": position, "kept": len(thumb) + len(rest)}]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_keep_one_is_identity_and_pruning_changes_output(next_model):
    model, processor = next_model
    inputs = two_prompts("llava_next", processor)
    reference = logits(model, inputs)
    with vlm_prune.pruned(model, "globalcom2", 1.0) as handle:
        assert torch.equal(logits(model, inputs), reference)
        assert all(s["kept"] == s["visual_tokens"] for s in handle.stats)
    with vlm_prune.pruned(model, "globalcom2", 0.25) as handle:
        pruned = logits(model, inputs)
        assert all(s["kept"] < s["visual_tokens"] for s in handle.stats)
    assert pruned.shape[1] < reference.shape[1]
    assert not torch.allclose(pruned[:, -1], reference[:, -1])


@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_generate_with_cache_equals_without(next_model, positions):
    model, processor = next_model
    inputs = two_prompts("llava_next", processor)
    with vlm_prune.pruned(model, "globalcom2", 0.25, positions=positions):
        assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))


def test_budget_options_refused(next_model):
    model, _ = next_model
    for budget in ("per_image", "pooled"):
        with pytest.raises(ValueError, match="budget"):
            vlm_prune.patch(model, "globalcom2", 0.25, budget=budget)
        assert vlm_prune.get_handle(model) is None


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_other_families_refused_at_patch_time(family):
    if family == "llava":
        model, processor = tiny.llava(image_size=112)
        inputs = processor(images=[tiny.random_image(64, 48)], text=["USER: <image>\nWhat is it? ASSISTANT:"],
                           return_tensors="pt")
    else:
        model, processor = tiny.qwen2_vl(version="2")
        inputs = make_inputs(processor, family, [(280, 196)], ["What is it?"])
    reference = logits(model, inputs)
    forward = model.model.forward
    with pytest.raises(ValueError, match="llava_next models only"):
        vlm_prune.patch(model, "globalcom2", 0.25)
    assert vlm_prune.get_handle(model) is None
    assert model.model.forward == forward and not model.model._forward_pre_hooks
    assert torch.equal(logits(model, inputs), reference)


def test_vllm_plugin_refuses_it():
    from vlm_prune.vllm_plugin.config import plugin_config

    with pytest.raises(ValueError, match="depends on the image"):
        plugin_config(SimpleNamespace(vlm_prune={"method": "globalcom2", "keep": 0.25}), "llava_next")
