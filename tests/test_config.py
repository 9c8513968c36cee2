"""Validation of PruneConfig and of `patch` arguments: clear errors, model untouched."""

from __future__ import annotations

import pytest

import vlm_prune
from vlm_prune.config import PruneConfig, tokens_to_keep


def test_available_methods_lists_the_registered_ones():
    assert {"cls_attention", "random", "pool"} <= set(vlm_prune.available_methods())


@pytest.mark.parametrize(
    "keep, error, fragment",
    [
        (0, ValueError, "keep=0"),
        (-3, ValueError, "keep=-3"),
        (0.0, ValueError, "keep=0.0"),
        (1.5, ValueError, "keep=1.5"),
        (float("nan"), ValueError, "keep=nan"),
        (True, TypeError, "bool"),
        ("64", TypeError, "keep='64'"),
        (None, TypeError, "keep=None"),
    ],
)
def test_bad_keep_is_rejected_with_the_value(keep, error, fragment):
    with pytest.raises(error, match=fragment):
        PruneConfig("cls_attention", keep)


def test_unknown_method_names_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown method 'fastest'.*cls_attention"):
        PruneConfig("fastest", 64)


def test_unknown_option_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"\['colour'\].*allowed.*layers"):
        PruneConfig.from_kwargs("cls_attention", 64, colour="red")


@pytest.mark.parametrize(
    "options, error, fragment",
    [
        ({"positions": "shuffled"}, ValueError, "positions='shuffled'"),
        ({"backend": "cuda"}, ValueError, "backend='cuda'"),
        ({"budget": "per_tile"}, ValueError, "budget='per_tile'"),
        ({"mode": "max"}, ValueError, "mode='max'"),
    ],
)
def test_bad_option_values(options, error, fragment):
    method = "pool" if "mode" in options else "cls_attention"
    with pytest.raises(error, match=fragment):
        PruneConfig.from_kwargs(method, 16, **options)


def test_layers_option_types():
    assert PruneConfig.from_kwargs("cls_attention", 8, layers=-2).options["layers"] == (-2,)
    with pytest.raises(TypeError, match="layers"):
        PruneConfig.from_kwargs("cls_attention", 8, layers=[1.5])
    with pytest.raises(ValueError, match="twice"):
        PruneConfig.from_kwargs("cls_attention", 8, layers=[1, 1])


def test_seed_must_be_an_int():
    with pytest.raises(TypeError, match="seed=0.5"):
        PruneConfig.from_kwargs("random", 8, seed=0.5)


def test_defaults_are_filled_in():
    config = PruneConfig.from_kwargs("pool", 0.25)
    assert config.options == {"mode": "avg"} and config.positions is None and config.backend == "auto"


def test_split_budget_is_proportional_and_exact():
    from vlm_prune.config import split_budget

    assert split_budget(576, [576, 1728]) == [144, 432]
    assert split_budget(10, [3, 3, 3]) == [3, 3, 3]  # capped at each region's size
    assert split_budget(7, [5, 5]) == [4, 3]  # the remainder goes to the earlier region
    assert sum(split_budget(101, [576, 600, 1152])) == 101


def test_int_and_float_budgets():
    assert tokens_to_keep(1, 576) == 1  # an int counts tokens
    assert tokens_to_keep(1.0, 576) == 576  # a float is a fraction
    assert tokens_to_keep(0.25, 576) == 144
    assert tokens_to_keep(1000, 576) == 576  # clamped to the tokens there are
    assert tokens_to_keep(1e-6, 576) == 1  # at least one token


def _state(model):
    return (
        dict(model.model._forward_pre_hooks),
        "generate" in vars(model),
        vlm_prune.get_handle(model),
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="nope", keep=8),
        dict(method="cls_attention", keep=0),
        dict(method="cls_attention", keep=8, layers=[99]),
        dict(method="cls_attention", keep=8, bogus=1),
    ],
)
def test_errors_leave_the_model_untouched(llava, kwargs):
    model, _ = llava
    before = _state(model)
    with pytest.raises((ValueError, TypeError)):
        vlm_prune.patch(model, **kwargs)
    assert _state(model) == before


def test_failed_repatch_keeps_the_previous_patch(llava):
    model, _ = llava
    handle = vlm_prune.patch(model, "pool", 16)
    with pytest.raises(ValueError):
        vlm_prune.patch(model, "pool", 16, mode="median")
    assert vlm_prune.get_handle(model) is handle and handle.active


def test_unsupported_model_is_named():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(model_type='llama'\).*supported.*llava"):
        vlm_prune.patch(llm, "cls_attention", 8)
    assert vlm_prune.get_handle(llm) is None


def test_cls_attention_needs_a_cls_token():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, image_size=28, patch_size=14)
    text = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_id=3, vision_feature_select_strategy="full"))
    with pytest.raises(ValueError, match=r"needs a \[CLS\] token.*SiglipVisionModel"):
        vlm_prune.patch(model, "cls_attention", 2)
    handle = vlm_prune.patch(model, "pool", 2)  # methods without [CLS] signals are fine
    assert handle.active
    vlm_prune.unpatch(model)
    assert not handle.active


def test_in_llm_methods_refuse_crop_budgets():
    """In-LLM methods rank each image's tokens as one pool; a per-crop budget would be ignored."""
    with pytest.raises(ValueError, match=r"budget='per_crop' is not available for 'transition'.*one pool"):
        PruneConfig.from_kwargs("transition", 0.25, budget="per_crop")
    assert PruneConfig.from_kwargs("fastv", 0.25, budget="pooled").budget == "pooled"


@pytest.mark.parametrize("method, message", [
    ("pool", "makes a coarser grid"), ("dct", "makes a coarser grid"),
    ("cls_attention", "image_newline tokens too"), ("visionzip", "image_newline tokens too"),
])
def test_pooled_budget_refuses_methods_that_need_a_grid_or_tower_signals(method, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig.from_kwargs(method, 0.25, budget="pooled")
    assert PruneConfig.from_kwargs("divprune", 0.25, budget="pooled").budget == "pooled"
