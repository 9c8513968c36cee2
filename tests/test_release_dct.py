"""`dct` on Qwen2-VL / 2.5-VL equals Fourier-VLM's release (github whyisverysmart/Fourier-Compressor @ 1f98b38,
integrations/qwen_vl): the merger's output low-passed per frame (orthonormal DCT, the coarse
inverse, no rescaling), and grid_thw shrunk so that the model numbers the image as an image of the
coarse grid. The reference builds the shorter prompt the release's processor makes and lets the
unpatched model number it (`get_rope_index`), with none of vlm_prune's code."""

from __future__ import annotations

import math

import pytest
import torch

import vlm_prune
from vlm_prune import tiny

from .test_families import make_inputs


def dct_basis(n: int) -> torch.Tensor:
    """[n, n] orthonormal DCT-II from the textbook formula."""
    return torch.tensor([[math.sqrt((1 if u == 0 else 2) / n) * math.cos(math.pi * (2 * i + 1) * u / (2 * n))
                          for i in range(n)] for u in range(n)], dtype=torch.float64)


def low_pass(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[h, w, D] -> [rows * cols, D]: DCT, the low rows x cols block, inverse DCT of that size."""
    h, w = grid.shape[:2]
    coefficients = torch.einsum("uh,hwd,vw->uvd", dct_basis(h), grid.double(), dct_basis(w))[:rows, :cols]
    out = torch.einsum("ur,uvd,vc->rcd", dct_basis(rows), coefficients, dct_basis(cols))
    return out.reshape(rows * cols, -1).to(grid.dtype)


def budget_grid(k: int, h: int, w: int) -> tuple[int, int]:
    """The coarse grid of a budget (vlm_prune's documented rule: aspect closest to h / w)."""
    rows = min(h, max(1, round(math.sqrt(k * h / w))))
    cols = min(w, max(1, k // rows))
    return min(h, max(1, k // cols)), cols


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_image_is_numbered_as_its_coarse_grid(version):
    model, processor = tiny.qwen2_vl(version=version, seed=8)
    inputs = make_inputs(processor, "qwen2_vl", [(280, 196)], ["What is it?"])
    (t, h, w), = inputs["image_grid_thw"].tolist()
    rows, cols = h // 2, w // 2
    keep = 0.3
    r, c = budget_grid(round(keep * rows * cols), rows, cols)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                  return_dict=True).pooler_output[0]
    reduced = low_pass(features.view(rows, cols, -1), r, c)
    # the prompt the release's processor makes: r * c placeholders, grid_thw (1, 2r, 2c)
    ids, types = inputs["input_ids"][0], inputs["mm_token_type_ids"][0]
    image = ids == model.config.image_token_id
    first = int(image.nonzero()[0])
    keep_cols = ~image
    keep_cols[first:first + r * c] = True
    new_ids, new_types = ids[keep_cols][None], types[keep_cols][None]
    grid = torch.tensor([[1, 2 * r, 2 * c]])
    with torch.no_grad():
        positions, deltas = model.model.get_rope_index(new_ids, mm_token_type_ids=new_types, image_grid_thw=grid,
                                                       attention_mask=torch.ones_like(new_ids))
        embeds = model.model.get_input_embeddings()(new_ids)
        embeds[0, first:first + r * c] = reduced
        hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        expected = model.lm_head(hidden)[0]
    seen = {}
    handle = vlm_prune.patch(model, "dct", keep)
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(positions=kw["position_ids"]), with_kwargs=True)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    hook.remove()
    assert handle.stats[0]["kept"] == r * c
    torch.testing.assert_close(seen["positions"][-3:], positions)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # decode continues the coarse numbering: greedy steps of the unpatched model on the release's
    # prompt, the generated tokens numbered by the model itself
    tokens, steps = [], []
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([new_ids, torch.tensor([tokens], dtype=torch.long)], 1)
            types = torch.cat([new_types, torch.zeros(1, len(tokens), dtype=new_types.dtype)], 1)
            positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid,
                                                      attention_mask=torch.ones_like(ids))
            embeds = model.model.get_input_embeddings()(ids)
            embeds[0, first:first + r * c] = reduced
            hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
            steps.append(model.lm_head(hidden)[0, -1])
            tokens.append(int(steps[-1].argmax()))
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert out.sequences[0, inputs["input_ids"].shape[1]:].tolist() == tokens
    for got, want in zip(out.logits, steps):
        torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
    # positions="original": the cell centres' positions, the text's unpruned -- another numbering
    vlm_prune.patch(model, "dct", keep, positions="original")
    with torch.no_grad():
        other = model(**inputs).logits[0]
    assert not torch.allclose(other, logits, atol=1e-4)
    handle.remove()


def test_renumbering_needs_a_grid_method():
    model, _ = tiny.qwen2_vl(seed=8)
    with pytest.raises(ValueError, match=r"positions='renumber' is not supported.*'cls_attention'.*\['original'\]"):
        vlm_prune.patch(model, "cls_attention", 0.5, positions="renumber")
    assert vlm_prune.get_handle(model) is None
