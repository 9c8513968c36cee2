"""generate() modes beyond greedy with a dynamic cache: beam search and several returned
sequences (generate repeats each prompt's images after encoding them once), and a static KV
cache (generate prepares 4D masks sized to the cache)."""

from __future__ import annotations

import pytest
import torch

import vlm_prune

from .test_families import BUILD, two_prompts

FAMILIES = ["llava", "llava_next", "qwen2_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model, processor = BUILD[request.param]()
    yield request.param, model, two_prompts(request.param, processor)
    vlm_prune.unpatch(model)


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, output_logits=True,
                              return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("mode", [dict(num_beams=2, do_sample=False),
                                  dict(num_return_sequences=2, do_sample=True, top_k=4)])
def test_each_repeated_prompt_gets_its_own_images(family_model, mode):
    _, model, inputs = family_model
    with vlm_prune.pruned(model, "cls_attention", 0.5) as handle:
        with torch.no_grad():
            want = model(**inputs).logits[:, -1]  # the pruned prefill of each prompt, once
        torch.manual_seed(0)
        out = _generate(model, inputs, **mode)
        assert len(handle.stats) == 4  # the prefill ran on the 2 x 2 repeated prompts
        assert all(s["kept"] < s["visual_tokens"] for s in handle.stats)
    first = out.logits[0]  # [4, V]: prompt 0 twice, then prompt 1 twice
    torch.testing.assert_close(first, want.repeat_interleave(2, dim=0), rtol=1e-4, atol=1e-4)


def test_static_cache_generates_what_the_dynamic_cache_does(family_model):
    _, model, inputs = family_model
    with vlm_prune.pruned(model, "cls_attention", 0.5) as handle:
        dynamic = _generate(model, inputs, do_sample=False)
        static = _generate(model, inputs, do_sample=False, cache_implementation="static")
        assert all(s["kept"] < s["visual_tokens"] for s in handle.stats)
    assert torch.equal(static.sequences, dynamic.sequences)
    for got, want in zip(static.logits, dynamic.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["fastv", "transition"])
def test_in_llm_methods_refuse_a_static_cache_and_keep_working(method):
    model, processor = BUILD["llava"](text_layers=4)
    inputs = two_prompts("llava", processor)
    with vlm_prune.pruned(model, method, 0.5, **({"layer": 2} if method == "fastv" else {})) as handle:
        with pytest.raises(NotImplementedError, match="static cache"):
            _generate(model, inputs, do_sample=False, cache_implementation="static")
        out = _generate(model, inputs, do_sample=False)  # the default cache still works after
        assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 4
        assert handle.layer_lengths[-1] < handle.layer_lengths[0]
