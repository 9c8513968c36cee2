"""`layers` is validated by one function on both paths (vlm_prune.vision_layers): transformers
and the vLLM plugin accept, resolve and refuse the same values, and errors name what the user
typed (a resolved index would point at a layer they never wrote)."""

from __future__ import annotations

import pytest

import vlm_prune
from vlm_prune import tiny
from vlm_prune.vision_layers import resolve_score_layers


def test_resolution_by_rule():
    # 4 layers: negative indices count from the end, the result is sorted, None is the feature layer
    assert resolve_score_layers([-1, 0], 4) == (0, 3)
    assert resolve_score_layers([2, -4, -3], 4) == (0, 1, 2)
    assert resolve_score_layers(None, 4, feature_layer=2) == (2,)


@pytest.mark.parametrize("layers, runs, message", [
    ([10], None, r"layers=\[10\]: \[10\] out of range for a vision tower of 4 layers \(allowed: -4 \.\. 3\)"),
    ([-5, 1], None, r"layers=\[-5, 1\]: \[-5\] out of range"),
    ([1, -3], None, r"layers=\[1, -3\] names the same layer twice"),
    # vLLM builds a 4-layer tower with the feature layer -2 as 3 layers: -1 is not run
    ([-1], 3, r"layers=\[-1\]: \[-1\] come after the layer that produces the LLM's features \(layer 2, i.e. -2\)"),
    ([0, 3], 3, r"layers=\[0, 3\]: \[3\] come after"),
])
def test_refusals_name_the_typed_value(layers, runs, message):
    with pytest.raises(ValueError, match=message):
        resolve_score_layers(layers, 4, feature_layer=2, runs=runs, engine="vLLM")


def test_transformers_path_uses_the_same_rule(llava):
    model, _ = llava  # a 3-layer CLIP tower
    for layers in ([10], [-4], [0, -3]):
        with pytest.raises(ValueError) as expected:
            resolve_score_layers(layers, 3)
        with pytest.raises(ValueError) as got:
            vlm_prune.patch(model, "cls_attention", 8, layers=layers)
        assert str(got.value) == str(expected.value)
    handle = vlm_prune.patch(model, "cls_attention", 8, layers=[-1, 0])
    assert handle._patch.adapter.score_layers == (0, 2)


def test_qwen_refuses_layers_instead_of_ignoring_them():
    model, _ = tiny.qwen2_vl(seed=0)
    with pytest.raises(ValueError, match=r"layers=\[0\] is not supported on Qwen-VL: its score comes from the "
                                         "attention each token receives in the last vision block"):
        vlm_prune.patch(model, "cls_attention", 8, layers=[0])
    assert vlm_prune.get_handle(model) is None
