"""The vectorised M-RoPE index (patches/mrope.py) against the model's own get_rope_index."""

from __future__ import annotations

import pytest
import torch

import vlm_prune
from vlm_prune import tiny
from vlm_prune.patches.mrope import image_rope_index


@pytest.fixture(scope="module", params=["2", "2.5"])
def qwen(request):
    return tiny.qwen2_vl(version=request.param, vision_depth=1, vision_hidden=32, text_hidden=32, text_layers=1,
                         max_pixels=200 * 200)


LAYOUTS = [  # (image sizes per row, questions): odd grids, rows of different lengths, two images in a row
    ([[(100, 80)]], ["What?"]),
    ([[(100, 80)], [(60, 140)]], ["What is in it, please?", "Hm?"]),
    ([[(100, 80), (60, 140)], [(200, 50)], []], ["Two images here?", "x", "no image in this row"]),
]


def _inputs(processor, sizes, questions, side):
    processor.tokenizer.padding_side = side
    images = [tiny.random_image(w, h, seed=i) for i, (w, h) in enumerate(s for row in sizes for s in row)]
    texts = [tiny.qwen_prompt(q, n_images=len(row)) if row else q for row, q in zip(sizes, questions)]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_image_rope_index_equals_the_models(qwen, layout, side):
    model, processor = qwen
    kw = _inputs(processor, *LAYOUTS[layout], side)
    expected, expected_deltas = model.model.get_rope_index(
        kw["input_ids"], mm_token_type_ids=kw["mm_token_type_ids"], image_grid_thw=kw["image_grid_thw"],
        attention_mask=kw["attention_mask"])
    got, deltas = image_rope_index(kw["mm_token_type_ids"], kw["attention_mask"], kw["image_grid_thw"].tolist(),
                                   model.config.vision_config.spatial_merge_size)
    valid = kw["attention_mask"].bool()
    assert torch.equal(got[:, valid], expected[:, valid])
    assert torch.equal(deltas, expected_deltas)


def test_prefill_checks_the_index_once_and_falls_back_when_the_model_numbers_differently(qwen):
    model, processor = qwen
    kw = _inputs(processor, *LAYOUTS[1], "left")
    with vlm_prune.pruned(model, "cls_attention", 0.5) as handle, torch.inference_mode():
        fast = model(**kw).logits
        assert handle._patch.adapter._fast_rope is True
        handle._patch.adapter._fast_rope = False  # the model's get_rope_index from here on
        assert torch.equal(model(**kw).logits, fast)

    # a transformers release that numbers text after an image differently: the check on the
    # first prompt must notice, warn, and hand the positions to the model's own function
    own = model.model.get_rope_index

    def shifted(*args, **kwargs):
        positions, deltas = own(*args, **kwargs)
        return positions + 1, deltas + 1

    model.model.get_rope_index = shifted
    try:
        with vlm_prune.pruned(model, "cls_attention", 0.5) as handle, torch.inference_mode():
            with pytest.warns(RuntimeWarning, match="M-RoPE"):
                model(**kw)
            assert handle._patch.adapter._fast_rope is False
            model(**kw)  # no second check: the model's numbering from now on
            assert torch.equal(model.model.rope_deltas, own(
                kw["input_ids"], mm_token_type_ids=kw["mm_token_type_ids"], image_grid_thw=kw["image_grid_thw"],
                attention_mask=kw["attention_mask"])[1] + 1)
    finally:
        del model.model.get_rope_index
