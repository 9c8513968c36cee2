"""Pipelines of several vision-stage methods (`"cls_attention+divprune"`, keep=(k1, k2)),
optionally followed by one in-LLM method, on one model instance.

The references are built another way: the first stage alone (the public path) gives its kept
slots and the tokens it hands the language model (read at the language model's input); the
second stage's choice is its method's own `reduce` called by hand on those tokens, with the
vision tower's signals (recomputed here by eager math) at those slots; the expected logits are
the unpatched language model run on the final tokens (`reference_logits`)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import vlm_prune
from vlm_prune import tiny
from vlm_prune.config import PruneConfig, tokens_to_keep
from vlm_prune.flops import prefill_flops, stage_lengths
from vlm_prune.patches.adapters.llava_next import PackedLayout
from vlm_prune.patches.image_tokens import VisionStage, passed_on_count_in_stages
from vlm_prune.pipeline_config import pipeline_config
from vlm_prune.registry import get_method
from vlm_prune.video_inputs import qwen_video_inputs

from .reference import eager_cls_scores, reference_logits
from .test_families import BUILD, _qwen_attention_received, greedy, logits, two_prompts, unpruned_positions
from .test_pipeline import _images_of_row, assert_refused_untouched, compacted_prompt, row_inputs


@pytest.fixture(scope="module")
def families():
    built = {name: BUILD[name](text_layers=4) for name in ("llava", "llava_next", "qwen2_vl")}
    built["qwen3_vl"] = tiny.qwen3_vl()
    yield built
    for model, _ in built.values():
        vlm_prune.unpatch(model)


def one_prompt(family, processor):
    """One unpadded row (its first image), as `two_prompts` makes it."""
    inputs = two_prompts(family, processor)
    real = inputs["attention_mask"][0].bool()
    single = {k: v[:1][:, real] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
              for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw", "image_sizes")}
    single.update(_images_of_row(family, inputs, 0))
    return single


class LanguageModelInputs:
    """What the language model receives in the forwards inside the block (the last one kept;
    entered after patching, so the patch's own pre-hooks ran first)."""

    def __init__(self, model):
        self.model, self.seen = model, {}

    def __enter__(self):
        self.hook = self.model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: self.seen.update(kwargs), with_kwargs=True)
        return self.seen

    def __exit__(self, *exc):
        self.hook.remove()


def visual_columns(model, input_ids, kept):
    """Columns of one row's compacted sequence that hold the image tokens kept (`kept`: indices
    into the image's placeholder run)."""
    is_image = input_ids == model.config.image_token_id
    run = is_image.nonzero().flatten()
    keep = ~is_image
    keep[run[kept]] = True
    return (keep.long().cumsum(0) - 1)[run[kept]]


def first_stage_alone(model, inputs, method, keep, **options):
    """(kept slots [K1], the tokens the stage hands the language model [K1, D], what it passed
    to the language model) of `method` alone on a one-row prompt."""
    with vlm_prune.pruned(model, method, keep, **options) as handle, LanguageModelInputs(model) as seen:
        logits(model, inputs)
        kept = handle.kept_indices[0]
    columns = visual_columns(model, inputs["input_ids"][0], kept)
    return kept, seen["inputs_embeds"][0, columns], dict(seen)


def feature_layer(model) -> int:
    """The vision encoder layer whose output LLaVA feeds the LLM (its [CLS] row scores cls_attention)."""
    layers = model.config.vision_config.num_hidden_layers
    return model.config.vision_feature_layer % (layers + 1) - 1


def llava_cls_scores(model, inputs):
    return eager_cls_scores(model, inputs["pixel_values"], [feature_layer(model)])[0]


# (family, first stage, its options when alone, second stage, keeps, positions): the second stage's
# method reads its signals (cls_attention) at the first stage's slots, or none (divprune, random)
TWO_STAGES = [
    ("llava", "cls_attention", {}, "divprune", (32, 12), "renumber"),
    ("llava", "cls_attention", {}, "divprune", (32, 12), "original"),  # each token at its slot's position
    ("llava", "divprune", {}, "cls_attention", (0.5, 0.4), "renumber"),
    ("llava", "visionzip", {"layout": "raster"}, "cls_attention", (0.5, 9), "renumber"),  # merged, then selected
    ("llava", "visionzip", {}, "cls_attention", (0.5, 9), "original"),
    ("llava", "random", {"seed": 4}, "divprune", (40, 0.3), "renumber"),
    ("llava_next", "cls_attention", {}, "divprune", (0.5, 0.5), "renumber"),
    ("qwen2_vl", "cls_attention", {}, "divprune", (0.5, 0.5), "original"),
    ("qwen2_vl", "divprune", {}, "cls_attention", (0.6, 10), "original"),
]


@pytest.mark.parametrize("family, first, first_options, second, keep, positions", TWO_STAGES)
def test_two_stages_equal_the_second_method_on_the_first_ones_tokens(families, family, first, first_options,
                                                                     second, keep, positions):
    model, processor = families[family]
    inputs = one_prompt(family, processor)
    kept, tokens, _ = first_stage_alone(model, inputs, first, keep[0], positions=positions, **first_options)
    n = len(kept)
    method = get_method(second)()
    signals = {}
    if "cls_attention" in method.needs:  # the tower's score at the slot each token occupies
        scores = llava_cls_scores(model, inputs) if family == "llava" else _qwen_attention_received(model, inputs)
        signals["cls_attention"] = scores[kept][None]
    config = PruneConfig.from_kwargs(second, keep[1])
    reduction = method.reduce(tokens[None], (1, n), tokens_to_keep(keep[1], n), signals, config.options)
    final = kept[reduction.index[0]]
    expected = reference_logits(model, inputs["input_ids"][0], [reduction.features[0]], [final.tolist()], positions,
                                unpruned_positions(model, inputs))
    # the first stage's options as alone (visionzip's layout: "auto" resolves to raster when a stage follows)
    stage_options = [{k: v for k, v in first_options.items() if k != "layout"}, {}]
    pipeline = f"{first}+{second}"
    with vlm_prune.pruned(model, pipeline, keep, positions=positions, stage_options=stage_options) as handle:
        out = logits(model, inputs)[0]
        assert handle.kept_indices[0].tolist() == final.tolist()
        assert handle.stats[0]["kept_per_stage"] == (n, len(final))
        assert handle.stats[0]["kept"] == len(final) < n < handle.stats[0]["visual_tokens"]
        assert {"stage1_s", "stage2_s"} <= set(handle.timings)
        assert handle.timings["select_s"] >= handle.timings["stage1_s"] + handle.timings["stage2_s"]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_deepstack_levels_follow_every_stage(families):
    """Qwen3-VL: the DeepStack levels of the final tokens are the first stage's (VisionZip's
    merges carried through, `follow_reduction`) at the tokens the second stage keeps; the
    tokens keep the first stage's M-RoPE positions."""
    model, processor = families["qwen3_vl"]
    inputs = one_prompt("qwen3_vl", processor)
    kept, tokens, seen = first_stage_alone(model, inputs, "visionzip", 0.5)
    n = len(kept)
    k = tokens_to_keep(0.4, n)
    index = get_method("divprune")().reduce(tokens[None], (1, n), k, {}, {}).index[0]
    visual, levels = seen["visual_pos_masks"][0], seen["deepstack_visual_embeds"]
    columns = visual.nonzero().flatten()
    with vlm_prune.pruned(model, "visionzip+divprune", (0.5, 0.4)) as handle, LanguageModelInputs(model) as now:
        logits(model, inputs)
        assert handle.kept_indices[0].tolist() == kept[index].tolist()
    assert torch.equal(now["inputs_embeds"][0, now["visual_pos_masks"][0]], tokens[index])
    for level, reduced in zip(levels, now["deepstack_visual_embeds"]):
        assert torch.equal(reduced, level[index])
    # each kept token at the position it had after the first stage (M-RoPE, original positions)
    first_positions = seen["position_ids"][..., 0, columns[index]]
    assert torch.equal(now["position_ids"][..., 0, now["visual_pos_masks"][0]], first_positions)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("method, keep", [("cls_attention", 0.3), ("visionzip", 0.4), ("divprune", 12)])
def test_a_one_stage_string_is_that_method_alone(families, family, method, keep):
    model, processor = families[family]
    inputs = two_prompts(family, processor)
    with vlm_prune.pruned(model, method, keep) as handle:
        expected, stats, kept = logits(model, inputs), handle.stats, handle.kept_indices
    with vlm_prune.pruned(model, f"{method}:{keep}") as handle:
        assert torch.equal(logits(model, inputs), expected)
        assert handle.stats == stats and "kept_per_stage" not in stats[0]
        assert all(torch.equal(a, b) for a, b in zip(handle.kept_indices, kept))


PIPELINES = [("cls_attention+divprune", (0.5, 0.5), {}), ("visionzip+random", (0.6, 0.5), {"seed": 3}),
             ("pool+cls_attention", (0.5, 0.6), {}), ("divprune+cls_attention+random", (0.7, 0.7, 0.7), {})]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("method, keep, options", PIPELINES)
def test_contracts(families, family, method, keep, options):
    """keep=1.0 everywhere is the unpatched model; each stage keeps fewer tokens; cached generate
    equals uncached; rows alone equal the padded batch; unpatch restores."""
    model, processor = families[family]
    inputs = two_prompts(family, processor)
    expected = logits(model, inputs)
    extra = {"positions": "original"} if method.startswith("pool") and family != "llava" else {}
    with vlm_prune.pruned(model, method, (1.0,) * len(keep), **options, **extra) as handle:
        assert torch.equal(logits(model, inputs), expected)
        assert all(s["kept_per_stage"] == (s["visual_tokens"],) * len(keep) for s in handle.stats)
    handle = vlm_prune.patch(model, method, keep, **options, **extra)
    try:
        with_cache = greedy(model, inputs)
        stats = handle.stats
        for s in stats:
            counts = (s["visual_tokens"], *s["kept_per_stage"])
            assert all(a > b for a, b in itertools.pairwise(counts)) and s["kept"] == counts[-1]
        assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
        assert len(set(handle.layer_lengths)) == 1  # the prompt is compacted once, before the LLM
        pruned = logits(model, inputs)
        assert not torch.allclose(pruned[:, -1], expected[:, -1], atol=1e-4)
        for row in range(2):
            single = row_inputs(family, inputs, row)
            torch.testing.assert_close(logits(model, single)[0, -1], pruned[row, -1], rtol=1e-4, atol=1e-5)
            assert handle.stats[0] == stats[row]
    finally:
        handle.remove()
    assert torch.equal(logits(model, inputs), expected)


def test_three_stages_are_the_in_llm_method_on_what_the_vision_stages_leave(families):
    """"cls_attention+divprune+fastv": the in-LLM stage alone on the prompt that holds only the
    tokens the two vision stages passed on gives the same logits and tokens; every stage is
    counted (stats, layer lengths, FLOPs)."""
    model, processor = families["llava"]
    inputs = two_prompts("llava", processor)
    with vlm_prune.pruned(model, "cls_attention+divprune", (32, 16)) as handle:
        logits(model, inputs)
        kept = handle.kept_indices
    short = compacted_prompt(model, inputs, kept)
    with vlm_prune.pruned(model, "fastv", 6, layer=1):
        expected = logits(model, short)[:, -1]
        expected_tokens = greedy(model, dict(short, mm_encoder_outputs=dict(short["mm_encoder_outputs"])))
    with vlm_prune.pruned(model, "cls_attention:32+divprune:16+fastv:6:layer=1") as handle:
        torch.testing.assert_close(logits(model, inputs)[:, -1], expected, rtol=1e-5, atol=1e-5)
        stats, lengths = handle.stats, handle.layer_lengths
        assert [s["kept_per_stage"] for s in stats] == [(32, 16, 6)] * 2
        assert [(s["after_vision"], s["kept"]) for s in stats] == [(16, 6)] * 2
        assert all(torch.equal(a, b) for a, b in zip(handle.kept_indices, kept))
        assert {"stage1_s", "stage2_s", "llm_select_s"} <= set(handle.timings)
        tokens = greedy(model, inputs)
    assert torch.equal(tokens[:, -5:], expected_tokens[:, -5:])
    # FLOPs: the layer lengths are those of the stages (vision stages: before layer 1)
    text = inputs["input_ids"].shape[1] - 64
    n_layers = model.config.text_config.num_hidden_layers
    assert lengths == stage_lengths(n_layers, text, 64, [(0, 32), (0, 16), (1, 6)])
    text_config = model.config.text_config
    ratio = prefill_flops(text_config, text + 64).ratio_to(prefill_flops(text_config, lengths))
    assert ratio > prefill_flops(text_config, text + 64).ratio_to(prefill_flops(text_config, text + 16)) > 1


def test_qwen_videos_go_through_every_stage(families):
    """A Qwen2-VL prompt with a video and one with an image and a video: each frame (the
    default video budget) is reduced by both stages; keep=1.0 is the unpatched model; cached
    equals uncached."""
    model, processor = families["qwen2_vl"]
    frames = [[tiny.random_image(112, 84, seed=s + i) for i in range(4)] for s in (0, 10)]
    vision = "<|vision_start|><|video_pad|><|vision_end|>"
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    inputs = qwen_video_inputs(processor, [vision + "What happens?", image + "and" + vision + "Which one moves?"],
                               frames, images=[tiny.random_image(84, 112, seed=7)])
    expected = logits(model, inputs)
    with vlm_prune.pruned(model, "cls_attention+divprune", (1.0, 1.0)):
        assert torch.equal(logits(model, inputs), expected)
    with vlm_prune.pruned(model, "cls_attention+divprune", (0.5, 0.5)) as handle:
        with_cache = greedy(model, inputs)
        per_frame = 12  # 4 x 3 merged tokens a frame, 2 temporal patches a video
        assert [s["video_tokens"] for s in handle.stats] == [2 * per_frame] * 2
        assert [s["video_kept"] for s in handle.stats] == [2 * tokens_to_keep(0.5, tokens_to_keep(0.5, 12))] * 2
        assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))


@pytest.mark.parametrize("family, method, keep, options, message", [
    ("llava", "cls_attention+pool", (32, 8), {}, "'pool' can only be the first vision stage.*coarser grid"),
    ("llava", "cls_attention+dct", (32, 8), {}, "'dct' can only be the first vision stage"),
    ("llava", "divprune+fopru", (32, 8), {"stage_options": [{}, {"strategy": "row"}]},
     "'fopru' can only be the first vision stage.*whole rows"),
    ("qwen2_vl", "cls_attention+evs", (0.5, 0.5), {}, "'evs' can only be the first vision stage.*previous frame"),
    ("llava_next", "cls_attention+globalcom2", (0.5, 0.5), {}, "'globalcom2' can only be the first.*whole image"),
    ("llava", "visionzip+divprune", (32, 8), {"stage_options": [{"layout": "release"}, {}]},
     "'visionzip' with layout='release' is followed by another vision stage"),
    ("llava", "cls_attention+divprune", (32, 8), {"stage_options": [{"positions": "original"}, {"positions": "renumber"}]},
     "share one position policy"),
    ("qwen2_vl", "dct+divprune", (0.5, 0.5), {"positions": "renumber"}, "positions='renumber' is not supported"),
    ("llava", "cls_attention+divprune+fastv+pool", (32, 16, 8, 4), {}, "then at most one in-LLM method"),
])
def test_what_a_later_stage_cannot_do_is_refused_before_anything_is_patched(families, family, method, keep, options,
                                                                          message):
    assert_refused_untouched(families, family, method, keep, options, message)


def test_a_grid_method_first_then_a_selection(families):
    """Qwen2-VL "dct+divprune": the first stage may need the grid; the pipeline's position policy is
    the one every stage allows (dct alone renumbers its coarse grid, divprune keeps original
    positions: original)."""
    model, processor = families["qwen2_vl"]
    inputs = one_prompt("qwen2_vl", processor)
    kept, tokens, _ = first_stage_alone(model, inputs, "dct", 0.5, positions="original")
    n = len(kept)
    index = get_method("divprune")().reduce(tokens[None], (1, n), tokens_to_keep(0.5, n), {}, {}).index[0]
    expected = reference_logits(model, inputs["input_ids"][0], [tokens[index]], [kept[index].tolist()], "original",
                                unpruned_positions(model, inputs))
    with vlm_prune.pruned(model, "dct+divprune", (0.5, 0.5)) as handle:
        torch.testing.assert_close(logits(model, inputs)[0], expected, rtol=1e-5, atol=1e-5)
        assert handle._patch.positions == "original"


@pytest.mark.parametrize("budgets, known", [(("per_crop", "pooled"), True), (("per_crop", "per_image"), True),
                                            (("per_image", "per_image"), True), (("per_image", "per_crop"), False),
                                            (("pooled", "per_image"), False)])
def test_the_count_known_before_the_image_is_the_count_kept(families, budgets, known):
    """`passed_on_count_in_stages` (what the vLLM plugin reserves) equals what the transformers
    path keeps on LLaVA-NeXT, where each later stage's regions hold a known number of the
    tokens passed on; None where a later region splits what an earlier one reduced."""
    model, processor = families["llava_next"]
    inputs = two_prompts("llava_next", processor)
    first = "random" if budgets[0] == "pooled" else "cls_attention"
    configs = [PruneConfig.from_kwargs(first, 0.5, budget=budgets[0]),
               PruneConfig.from_kwargs("divprune", 0.6, budget=budgets[1])]
    stages = [VisionStage(get_method(c.method)(), c, c.budget) for c in configs]
    sizes = inputs["image_sizes"]
    layouts = [PackedLayout.of(model.config, sizes, c.budget, "cpu") for c in configs]
    counts = [passed_on_count_in_stages(stages, [layout.regions[i] for layout in layouts], layouts[0].lengths[i])
              for i in range(len(sizes))]
    if not known:
        assert counts == [None, None]
        return
    with vlm_prune.pruned(model, f"{first}+divprune", (0.5, 0.6), stage_options=[{"budget": b} for b in budgets]) as h:
        logits(model, inputs)
        assert counts == [s["kept"] for s in h.stats]


def test_the_configuration_routes_options_to_the_vision_stages():
    config = pipeline_config("cls_attention:288+divprune:144+fastv:64:layer=1", backend="torch")
    assert [(s.method, s.keep) for s in config.stages] == [("cls_attention", 288), ("divprune", 144), ("fastv", 64)]
    assert [s.method for s in config.vision_stages] == ["cls_attention", "divprune"]
    assert config.llm_stage.options["layer"] == 1 and {s.backend for s in config.stages} == {"torch"}
    assert pipeline_config(**config.as_kwargs()) == config
    two = pipeline_config("cls_attention+divprune", keep=(192, 64), budget="per_image")
    assert two.llm_stage is None and [s.budget for s in two.stages] == ["per_image", "per_image"]
    with pytest.raises(ValueError, match="option 'layers' is an option of several stages"):
        pipeline_config("cls_attention+fopru", (64, 16), layers=[-2])


def test_timings_and_flops_of_a_vision_pipeline(families):
    model, processor = families["llava"]
    inputs = two_prompts("llava", processor)
    with vlm_prune.pruned(model, "cls_attention+divprune", (32, 16)) as handle:
        logits(model, inputs)
        lengths = handle.layer_lengths
    text = inputs["input_ids"].shape[1] - 64
    assert lengths == stage_lengths(model.config.text_config.num_hidden_layers, text, 64, [(0, 32), (0, 16)])
    assert lengths == [text + 16] * model.config.text_config.num_hidden_layers
    assert math.isclose(prefill_flops(model.config.text_config, lengths).total,
                        prefill_flops(model.config.text_config, text + 16).total)



def test_the_bench_takes_a_vision_pipeline_and_its_flops():
    """`vlm-prune bench --method "cls_attention:0.5+divprune:0.5"`: kept tokens after the last
    stage, the theoretical ratio from the pipeline's layer lengths."""
    from vlm_prune import bench

    result = bench.run(shape="tiny", method="cls_attention:0.5+divprune:0.5", keep=None, repeats=1, threads=1)
    assert (result.visual_tokens, result.kept_tokens) == (576, 144)
    assert result.llm_tokens_unpruned - result.llm_tokens_pruned == 576 - 144
    text_config = tiny.llava_config(**bench.SHAPES["tiny"][1]).text_config
    expected = prefill_flops(text_config, result.llm_tokens_unpruned).ratio_to(
        prefill_flops(text_config, result.llm_tokens_pruned))
    assert math.isclose(result.theoretical_llm_ratio, expected)
