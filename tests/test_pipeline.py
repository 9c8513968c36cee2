"""Pipelines: a vision-stage method, then an in-LLM method (`"cls_attention+fastv"`,
keep=(k1, k2)), on one model instance (several vision stages: tests/test_vision_pipeline.py).

The reference is built another way: the vision stage alone gives the kept image features; the
in-LLM method alone then runs on a prompt that holds only those (its image placeholders cut to
the kept ones, the features handed to the model pre-encoded as `mm_encoder_outputs`): the same
sequence the pipeline's second stage sees, reached without the pipeline."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vlm_prune
from vlm_prune.pipeline_config import parse_stages, pipeline_config

from .test_families import BUILD, greedy, logits, two_prompts

PIPELINES = [("cls_attention+fastv", (0.5, 0.4), {"layer": 1}), ("pool+fastv", (0.5, 0.25), {"layer": 2}),
             ("visionzip+transition", (0.5, 0.5), {}), ("divprune+fastv", (0.4, 0.5), {"layer": 1, "query": "instruction"})]


@pytest.fixture(scope="module")
def families():
    built = {name: BUILD[name](text_layers=4) for name in ("llava", "llava_next", "qwen2_vl")}
    yield built
    for model, _ in built.values():
        vlm_prune.unpatch(model)


def compacted_prompt(model, inputs, kept):
    """The prompt with only the kept image placeholders (kept: per image, indices into its
    tokens) and the kept features [K_i, D] pre-encoded."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image = ids == model.config.image_token_id
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
    keep = ~image
    rows, image_index = [], 0
    for row in range(ids.shape[0]):
        slots = image[row].nonzero().flatten()
        keep[row, slots[kept[image_index]]] = True
        image_index += 1
    lengths = keep.sum(1)
    assert len(set(lengths.tolist())) == 1, "rows of equal length keep the test simple"
    new_ids = ids[keep].view(ids.shape[0], -1)
    new_mask = mask[keep].view(ids.shape[0], -1)
    encoded = BaseModelOutputWithPooling(pooler_output=[f[k] for f, k in zip(features, kept)])
    return {"input_ids": new_ids, "attention_mask": new_mask, "mm_encoder_outputs": {"image": encoded}}


@pytest.mark.parametrize("method, keep, options", [("cls_attention+fastv", (32, 12), {"layer": 1}),
                                                   ("divprune+fastv", (20, 8), {"layer": 1, "query": "instruction"}),
                                                   ("random+transition", (32, 16), {})])
def test_a_pipeline_is_its_second_stage_on_the_first_stages_output(families, method, keep, options):
    """LLaVA (renumbered positions): the pipeline's logits and greedy tokens equal the in-LLM
    method alone on the prompt the vision stage leaves (selection methods: the kept tokens are
    the tower's own features at `kept_indices`)."""
    model, processor = families["llava"]
    inputs = two_prompts("llava", processor)
    first, second = method.split("+")
    with vlm_prune.pruned(model, first, keep[0]) as handle:
        logits(model, inputs)
        kept = handle.kept_indices
    short = compacted_prompt(model, inputs, kept)
    with vlm_prune.pruned(model, second, keep[1], **options):
        expected = logits(model, short)[:, -1]
        expected_tokens = greedy(model, dict(short, mm_encoder_outputs=copy.copy(short["mm_encoder_outputs"])))
    with vlm_prune.pruned(model, method, keep, **options) as handle:
        torch.testing.assert_close(logits(model, inputs)[:, -1], expected, rtol=1e-5, atol=1e-5)
        tokens = greedy(model, inputs)
        assert [s["kept"] for s in handle.stats] == [min(keep[1], k) for k in map(len, kept)]
    assert torch.equal(tokens[:, -5:], expected_tokens[:, -5:])


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("method, keep, options", PIPELINES)
def test_contracts(families, family, method, keep, options):
    """keep=1.0 everywhere is the unpatched model; a pruning pipeline keeps fewer tokens than its
    first stage, its cached generate equals the uncached one, its rows alone equal the batch, and
    unpatch restores."""
    model, processor = families[family]
    inputs = two_prompts(family, processor)
    expected = logits(model, inputs)
    stage_options = [{"positions": "original"}, {}] if method.startswith("pool") and family != "llava" else None
    extra = {"stage_options": stage_options} if stage_options else {}
    with vlm_prune.pruned(model, method, (1.0, 1.0), **options, **extra):
        assert torch.equal(logits(model, inputs), expected)
    handle = vlm_prune.patch(model, method, keep, **options, **extra)
    try:
        with_cache = greedy(model, inputs)
        stats = handle.stats
        assert all(s["kept"] < s["after_vision"] < s["visual_tokens"] for s in stats)
        assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
        assert len(handle.layer_lengths) == model.config.text_config.num_hidden_layers
        assert handle.layer_lengths[-1] < handle.layer_lengths[0] < inputs["input_ids"].shape[1]
        pruned = logits(model, inputs)
        assert not torch.allclose(pruned[:, -1], expected[:, -1], atol=1e-4)
        for row in range(2):
            single = row_inputs(family, inputs, row)
            single_logits = logits(model, single)
            real = int(inputs["attention_mask"][row].sum())
            torch.testing.assert_close(single_logits[0, -1], pruned[row, -1], rtol=1e-4, atol=1e-5)
            assert handle.stats[0] == stats[row]
            assert real > 0
    finally:
        handle.remove()
    assert torch.equal(logits(model, inputs), expected)


def row_inputs(family, inputs, row):
    """Row `row` of a batch with one image per row (as two_prompts makes it), with its image."""
    single = {k: v[row:row + 1] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw",
                                                                        "image_sizes")}
    single.update(_images_of_row(family, inputs, row))
    return single


def _images_of_row(family, inputs, row):
    """The pixel inputs of one row's image (one image per row in two_prompts); Qwen-VL families
    (an `image_grid_thw`) slice their patches by the grid."""
    if "image_grid_thw" in inputs:
        grid = inputs["image_grid_thw"]
        sizes = grid.prod(-1).tolist()
        start = sum(sizes[:row])
        return {"pixel_values": inputs["pixel_values"][start:start + sizes[row]], "image_grid_thw": grid[row:row + 1]}
    out = {"pixel_values": inputs["pixel_values"][row:row + 1]}
    if "image_sizes" in inputs:
        out["image_sizes"] = inputs["image_sizes"][row:row + 1]
    return out


def test_labels_follow_both_stages(families):
    """A forward with labels: the loss is the model's own on the columns the last layer holds
    (the vision stage's kept columns, then the in-LLM stage's)."""
    model, processor = families["llava"]
    inputs = two_prompts("llava", processor)
    labels = inputs["input_ids"].clone()
    with vlm_prune.pruned(model, "cls_attention+fastv", (32, 12), layer=1) as handle:
        with torch.no_grad():
            out = model(**inputs, labels=labels)
        patch = handle._patch
        columns = patch.vision._input_compaction.index  # [B, L'] original column of each compacted slot
        inner = patch.llm._index  # [B, L''] compacted column of each slot the last layer holds
    kept = torch.where(inner >= 0, columns.gather(1, inner.clamp(min=0)), -1)
    kept_labels = torch.where(kept >= 0, labels.gather(1, kept.clamp(min=0)), -100)
    expected = model.loss_function(out.logits, kept_labels, vocab_size=model.config.text_config.vocab_size)
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.shape[1] == kept.shape[1] < labels.shape[1]


def test_the_string_form_and_option_routing():
    config = pipeline_config("visionzip:192+transition:64:alpha=0.5")
    assert [(s.method, s.keep) for s in config.stages] == [("visionzip", 192), ("transition", 64)]
    assert config.stages[1].options["alpha"] == 0.5
    assert parse_stages("a:0.5+b") == [("a", 0.5, {}), ("b", None, {})]
    # an option declared by one stage goes there; a common option to every stage that takes it
    routed = pipeline_config("cls_attention+fastv", (64, 16), layer=3, backend="torch")
    assert routed.stages[1].options["layer"] == 3 and [s.backend for s in routed.stages] == ["torch", "torch"]
    again = pipeline_config(**routed.as_kwargs())
    assert again == routed


@pytest.mark.parametrize("method, keep, options, message", [
    ("fastv+cls_attention", (16, 64), {}, "one or more vision-stage methods, then at most one in-LLM method"),
    ("cls_attention+fastv+transition", (64, 16, 8), {}, "then at most one in-LLM method"),
    ("cls_attention+pool", (64, 16), {}, "'pool' can only be the first vision stage"),
    ("cls_attention+fastv", 64, {}, "takes one keep per stage"),
    ("cls_attention+fastv", (64,), {}, "takes one keep per stage"),
    ("cls_attention:64+fastv", None, {}, r"no keep for stage\(s\) \['fastv'\]"),
    ("cls_attention+fastv", (64, 16), {"mode": "avg"}, "option 'mode' belongs to no stage"),
    ("cls_attention+nope", (64, 16), {}, "unknown method 'nope'"),
    ("cls_attention+fastv", (64, 16), {"stage_options": [{}]}, "must be a list of 2 dicts"),
    ("cls_attention", 64, {"stage_options": [{}]}, "applies to pipelines"),
])
def test_bad_pipelines_are_refused_before_anything_is_patched(families, method, keep, options, message):
    assert_refused_untouched(families, "llava", method, keep, options, message)


def assert_refused_untouched(families, family, method, keep, options, message):
    """patch() raises a ValueError matching `message`, and the model is left exactly as it was."""
    model, processor = families[family]
    inputs = two_prompts(family, processor)
    expected = logits(model, inputs)
    with pytest.raises(ValueError, match=message):
        vlm_prune.patch(model, method, keep, **options)
    assert vlm_prune.get_handle(model) is None
    assert torch.equal(logits(model, inputs), expected)


def test_a_one_stage_pipeline_is_that_method(families):
    model, processor = families["llava"]
    inputs = two_prompts("llava", processor)
    with vlm_prune.pruned(model, "cls_attention", 16):
        expected = logits(model, inputs)
    with vlm_prune.pruned(model, "cls_attention:16") as handle:
        assert torch.equal(logits(model, inputs), expected)
        assert handle.config.method == "cls_attention"


def test_pruned_restores_an_earlier_pipeline(families):
    model, processor = families["llava"]
    inputs = two_prompts("llava", processor)
    handle = vlm_prune.patch(model, "cls_attention+fastv", (32, 12), layer=1)
    try:
        expected = logits(model, inputs)
        with vlm_prune.pruned(model, "pool", 0.25):
            pass
        assert vlm_prune.get_handle(model) is handle and handle.config.method == "cls_attention+fastv"
        assert torch.equal(logits(model, inputs), expected)
    finally:
        vlm_prune.unpatch(model)


def test_the_string_form_where_configurations_are_read(capsys):
    """`vlm-prune eval --compare` and `vlm-prune bench --method` take a pipeline string; a bad one
    is refused with the reason before anything runs."""
    from evals.configs import parse_config

    from vlm_prune import cli

    config = parse_config("cls_attention:0.5+fastv:0.25:layer=1,query=instruction")
    assert config.keep is None and config.name == "cls_attention_0.5_fastv_0.25_layer=1,query=instruction"
    with pytest.raises(ValueError, match="then at most one in-LLM method"):
        parse_config("fastv:0.5+pool:0.25")
    with pytest.raises(SystemExit):
        cli.main(["bench", "--method", "fastv:0.5+pool:0.25"])
    assert "a pipeline is one or more vision-stage methods, then at most one in-LLM method" in capsys.readouterr().err
    assert cli.main(["bench", "--shape", "tiny", "--method", "cls_attention:0.25+fastv:0.5:layer=1",
                     "--repeats", "1", "--out", ""]) == 0
    report = capsys.readouterr().out
    assert "cls_attention:0.25+fastv:0.5:layer=1" in report and "576          72" in report


def test_a_deep_copy_runs_its_own_pipeline(families):
    model, processor = families["llava"]
    inputs = two_prompts("llava", processor)
    expected = logits(model, inputs)
    with vlm_prune.pruned(model, "cls_attention+fastv", (32, 12), layer=1):
        pruned = logits(model, inputs)
        twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, inputs), pruned)  # the copy carries the pipeline
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.01)
    assert not torch.equal(logits(twin, inputs), pruned)  # its own weights
    assert torch.equal(greedy(twin, inputs), greedy(twin, inputs, use_cache=False))
    assert torch.equal(logits(model, inputs), expected)  # the original: unpatched, untouched
    vlm_prune.unpatch(twin)
    assert logits(twin, inputs).shape == expected.shape
