"""A patched model used first under torch.inference_mode, then with autograd on: what the patch
keeps across calls (DCT bases, LLaVA-NeXT's crop layout) must not be inference tensors, which
autograd refuses to save."""

from __future__ import annotations

import pytest
import torch

import vlm_prune

from .test_families import BUILD, two_prompts

@pytest.mark.parametrize("family, method", [("llava", "dct"), ("llava_next", "cls_attention"),
                                            ("llava_next", "dct"), ("qwen2_5_vl", "dct")])
def test_inference_mode_then_autograd(family, method):
    model, processor = BUILD[family]()
    inputs = two_prompts(family, processor)
    with vlm_prune.pruned(model, method, 0.5) as handle:
        with torch.inference_mode():
            first = model(**inputs).logits
        logits = model(**inputs).logits  # autograd on, same inputs: the patch's caches are reused
        logits.float().sum().backward()
        assert all(s["kept"] < s["visual_tokens"] for s in handle.stats)
    torch.testing.assert_close(logits.detach(), first, rtol=1e-5, atol=1e-5)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
