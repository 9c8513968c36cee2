"""A forward given `labels` (lmms-eval scores multiple-choice answers by the loss of a forward
with labels; a fine-tuning step does the same): the pruned forward's logits cover only the
columns it kept, so the loss is the model's loss on the labels of those columns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlm_prune

from .test_families import BUILD, two_prompts

ANSWER = 3  # labelled tokens at the end of each (left-padded) row


def _answer_labels(ids: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[:, -ANSWER:] = ids[:, -ANSWER:]
    return labels


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("method, options", [("cls_attention", {}), ("fastv", {"layer": 1})])
def test_loss_is_the_answers_loss_on_the_kept_tokens(family, method, options):
    model, processor = BUILD[family](text_layers=3)
    inputs = two_prompts(family, processor)  # two image sizes: the rows keep different counts
    labels = _answer_labels(inputs["input_ids"])
    with torch.no_grad():
        unpatched = model(**inputs, labels=labels).loss
    with vlm_prune.pruned(model, method, 1.0, **options):
        with torch.no_grad():
            assert torch.equal(model(**inputs, labels=labels).loss, unpatched)
    with vlm_prune.pruned(model, method, 0.25, **options) as handle:
        out = model(**inputs, labels=labels)
        assert all(s["kept"] < s["visual_tokens"] for s in handle.stats)
        assert out.logits.shape[1] < labels.shape[1]
        as_tuple = model(**inputs, labels=labels, return_dict=False)
    # the answer is text at the end of every row, so its logits are the last ones
    predicted = out.logits[:, -ANSWER - 1:-1].flatten(0, 1).float()
    expected = F.cross_entropy(predicted, inputs["input_ids"][:, -ANSWER:].flatten())
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(as_tuple[0], out.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_labels_of_dropped_tokens_go_with_them():
    """Labels on every token (image placeholders included): the loss covers the kept columns
    only, i.e. equals the loss with the dropped tokens' labels ignored by hand."""
    model, processor = BUILD["llava"](text_layers=3)
    inputs = two_prompts("llava", processor)
    ids = inputs["input_ids"]
    labels = ids.masked_fill(inputs["attention_mask"] == 0, -100)
    with vlm_prune.pruned(model, "cls_attention", 0.25) as handle, torch.no_grad():
        loss = model(**inputs, labels=labels).loss
        logits = model(**inputs).logits
        kept = handle.kept_indices
    is_image = ids == model.config.image_token_id
    keep = inputs["attention_mask"].bool().clone()
    for row, indices in enumerate(kept):  # one image per row, in row order
        image_columns = is_image[row].nonzero().flatten()
        dropped = torch.ones(len(image_columns), dtype=torch.bool)
        dropped[indices] = False
        keep[row, image_columns[dropped]] = False
    kept_labels = [labels[row, keep[row]] for row in range(ids.shape[0])]
    width = logits.shape[1]  # rows keep the same count here (LLaVA-1.5: 64 tokens per image)
    aligned = torch.stack([F.pad(row, (width - len(row), 0), value=-100) for row in kept_labels])
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), aligned[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
