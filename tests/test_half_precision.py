"""Checkpoints usually run in bf16 / fp16: every method on every family in half precision keeps
the model's dtype, keep=1.0 stays bit-identical, and a pruned generate runs."""

from __future__ import annotations

import pytest
import torch

import vlm_prune
from vlm_prune.registry import get_method

from .test_families import BUILD, two_prompts

DTYPES = {"llava": torch.float16, "llava_next": torch.bfloat16, "qwen2_vl": torch.bfloat16, "qwen2_5_vl": torch.float16}


@pytest.fixture(scope="module", params=list(BUILD))
def half_model(request):
    dtype = DTYPES[request.param]
    model, processor = BUILD[request.param](dtype=dtype, text_layers=4)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in two_prompts(request.param, processor).items()}
    with torch.no_grad():
        reference = model(**inputs).logits
    yield model, inputs, reference
    vlm_prune.unpatch(model)


@pytest.mark.parametrize("method", vlm_prune.available_methods())
def test_every_method_in_half_precision(half_model, method):
    model, inputs, reference = half_model
    families = getattr(get_method(method), "families", None)
    if families is not None and model.config.model_type not in families:  # a method for other families
        with pytest.raises(ValueError, match="models only"):
            vlm_prune.patch(model, method, 0.5)
        assert vlm_prune.get_handle(model) is None
        return
    options = {"layer": 2} if method == "fastv" else {}
    with torch.no_grad():
        with vlm_prune.pruned(model, method, 1.0, **options):
            assert torch.equal(model(**inputs).logits, reference)
        with vlm_prune.pruned(model, method, 0.5, **options) as handle:
            logits = model(**inputs).logits
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert logits.dtype == reference.dtype and bool(torch.isfinite(logits).all())
    if method == "evs":  # a video method: images (one frame, nothing to compare with) stay whole
        assert all(s["kept"] == s["visual_tokens"] for s in handle.stats)
    else:
        assert all(s["kept"] < s["visual_tokens"] for s in handle.stats)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
