"""A later chat turn that brings a new image, on the KV cache of the earlier turns: the new
image is pruned as a prefill's would be, its tokens numbered after the cached ones, and the
cache it fills decodes (and takes further turns) as one pruned conversation."""

from __future__ import annotations

import copy

import pytest
import torch

import vlm_prune
from vlm_prune import tiny

from .reference import eager_cls_scores, image_features, reference_logits, top_k_sorted
from .test_families import BUILD, two_prompts

NEW_SIZES = {"llava": [(48, 64), (64, 48)], "llava_next": [(100, 300), (280, 196)]}  # NeXT: 4 and 5 crops
QUESTIONS = [" USER: <image>\nAnd this one? ASSISTANT:", " USER: <image>\nWhat about this picture? ASSISTANT:"]
IMAGE_KEYS = ("pixel_values", "image_sizes")


def _new_turn(processor, rows: int, family: str) -> dict[str, torch.Tensor]:
    """A new question with a new image per row (left-padded: the pad sits mid-conversation)."""
    images = [tiny.random_image(w, h, seed=10 + i) for i, (w, h) in enumerate(NEW_SIZES[family][:rows])]
    return processor(images=images, text=QUESTIONS[:rows], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def _interleave(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per-image tensors of two turns (one image per row each) in the order a forward of the
    whole conversation reads them: row 0's two images, then row 1's; crops padded to match."""
    if first.dim() == 5 and first.shape[1] != second.shape[1]:  # LLaVA-NeXT [images, crops, C, H, W]
        crops = max(first.shape[1], second.shape[1])
        first, second = (torch.cat([x, x.new_zeros(x.shape[0], crops - x.shape[1], *x.shape[2:])], 1)
                         for x in (first, second))
    return torch.stack([first, second], 1).flatten(0, 1)


def _conversation(first_inputs, first, turn, extra_ids=None):
    """The whole conversation's ids and mask (first prompt, its answer, the new turn[, more])."""
    answer = first.sequences.shape[1] - first_inputs["input_ids"].shape[1]
    ids = torch.cat([first.sequences, turn["input_ids"]], 1)
    mask = torch.cat([first_inputs["attention_mask"], torch.ones(ids.shape[0], answer, dtype=torch.long),
                      turn["attention_mask"]], 1)
    if extra_ids is not None:
        ids = torch.cat([ids, extra_ids], 1)
        mask = torch.cat([mask, torch.ones_like(extra_ids)], 1)
    return ids, mask


def _generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generate() numbers a padded batch: real tokens counted, so the pad in the
    middle of a conversation is skipped (a plain forward would count it)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _check_a_text_turn_after(model, processor, answered: torch.Tensor, mask: torch.Tensor, whole: dict,
                             cache) -> None:
    """A text-only turn on `cache` (which holds the conversation `answered` but its last token;
    `mask`: the conversation's before the answer, `whole`: a fresh forward's inputs for it):
    its next-token logits equal a fresh pruned prefill of the whole conversation."""
    question = processor.tokenizer([" Sure?"] * answered.shape[0], return_tensors="pt",
                                   add_special_tokens=False).input_ids
    ids = torch.cat([answered, question], 1)
    mask = torch.cat([mask, torch.ones(ids.shape[0], ids.shape[1] - mask.shape[1], dtype=torch.long)], 1)
    got = _generate(model, {"input_ids": ids, "attention_mask": mask}, cache=cache)
    with torch.no_grad():
        want = model(**{**whole, "input_ids": ids, "attention_mask": mask,
                        "position_ids": _generate_positions(mask)}).logits[:, -1]
    torch.testing.assert_close(got.logits[0], want, rtol=1e-4, atol=1e-4)


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, suppress_tokens=[model.config.image_token_id], **kw)


@pytest.mark.parametrize("family, positions", [("llava", "renumber"), ("llava_next", "renumber"),
                                               ("llava_next", "original")])
@pytest.mark.parametrize("given", ["whole", "new only"])
def test_a_new_image_in_a_later_turn_is_pruned_on_the_cache(family, positions, given):
    """generate() on the first turn's cache with the whole conversation (or only the new turn,
    with the whole mask) and the new images. cls_attention scores each image alone, so the
    logits must equal a fresh pruned prefill of the whole conversation with both images, for
    the new turn and for a text-only third turn on the cache the second one filled. A padded
    batch of two whose new images keep different numbers of tokens on LLaVA-NeXT; kept tokens
    renumbered or at their original positions."""
    model, processor = BUILD[family]()
    inputs = two_prompts(family, processor)
    with vlm_prune.pruned(model, "cls_attention", 0.25, positions=positions) as handle:
        first = _generate(model, inputs)
        first_stats = handle.stats
        cached = first.cache.get_seq_length()
        turn = _new_turn(processor, 2, family)
        ids, mask = _conversation(inputs, first, turn)
        # the cache lacks the first answer's last token: it comes with the new turn
        given_ids = ids if given == "whole" else ids[:, first.sequences.shape[1] - 1:]
        second = _generate(model, {"input_ids": given_ids, "attention_mask": mask,
                                   **{k: turn[k] for k in IMAGE_KEYS if k in turn}}, cache=first.cache)
        new_stats = handle.stats
        assert all(s["kept"] < s["visual_tokens"] for s in new_stats)
        if family == "llava_next":
            assert new_stats[0]["kept"] != new_stats[1]["kept"]  # the new turn's rows are re-padded
        width = max(n - s["visual_tokens"] + s["kept"] for n, s in zip(turn["attention_mask"].sum(1), new_stats))
        assert second.cache.get_seq_length() == cached + 1 + width + 2  # the last answer token, new turn, 2 decoded
        whole = {"input_ids": ids, "attention_mask": mask, "position_ids": _generate_positions(mask),
                 **{k: _interleave(inputs[k], turn[k]) for k in IMAGE_KEYS if k in turn}}
        with torch.no_grad():
            want = model(**whole).logits[:, -1]
        assert [s["kept"] for s in handle.stats] == [a["kept"] + b["kept"] for a, b in zip(first_stats, new_stats)]
        torch.testing.assert_close(second.logits[0], want, rtol=1e-4, atol=1e-4)
        answered = second.sequences if given == "whole" else torch.cat([first.sequences[:, :-1], second.sequences], 1)
        _check_a_text_turn_after(model, processor, answered, mask, whole, second.cache)


@pytest.mark.parametrize("method", ["dct", "divprune", "pool", "random", "visionzip", "text_recovery"])
def test_every_vision_stage_method_prunes_a_new_image_as_a_fresh_prefill_would(method):
    """LLaVA-NeXT, a padded batch: the new images keep what a fresh pruned prefill of the whole
    conversation keeps of them. The methods that score an image alone (or merge its tokens)
    give that prefill's logits; text_recovery reads each image's question, which for the first
    image differs between the two (the fresh prefill's is the text after the last image)."""
    model, processor = BUILD["llava_next"]()
    inputs = two_prompts("llava_next", processor)
    with vlm_prune.pruned(model, method, 0.25) as handle:
        first = _generate(model, inputs)
        turn = _new_turn(processor, 2, "llava_next")
        ids, mask = _conversation(inputs, first, turn)
        second = _generate(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": turn["pixel_values"],
                                   "image_sizes": turn["image_sizes"]}, cache=first.cache)
        new_kept = handle.kept_indices
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, position_ids=_generate_positions(mask),
                         **{k: _interleave(inputs[k], turn[k]) for k in IMAGE_KEYS}).logits[:, -1]
        fresh_kept = handle.kept_indices[1::2]  # the second image of each row
    assert len(new_kept) == 2 and all(torch.equal(a, b) for a, b in zip(new_kept, fresh_kept))
    if method != "text_recovery":
        torch.testing.assert_close(second.logits[0], want, rtol=1e-4, atol=1e-4)


def test_a_new_image_on_an_unpruned_cache_is_checked_against_the_unpatched_model():
    """The first turn ran unpatched; the second, patched, brings an image: only that image is
    pruned, keeping the top [CLS]-attention tokens of an eager copy of the tower, and the logits
    equal the unpatched language model run on the conversation with those tokens (one row;
    renumbered positions drop only the second image's tokens)."""
    model, processor = BUILD["llava"]()
    inputs = processor(images=[tiny.random_image(64, 48, seed=0)], text=["USER: <image>\nWhat is it? ASSISTANT:"],
                       return_tensors="pt")
    first = _generate(model, inputs)
    turn = _new_turn(processor, 1, "llava")
    ids, mask = _conversation(inputs, first, turn)
    keep = 16
    new = ids[:, first.sequences.shape[1] - 1:]
    labels = new.masked_fill(new == model.config.image_token_id, -100)
    with vlm_prune.pruned(model, "cls_attention", keep) as handle, torch.no_grad():
        second = model(input_ids=new, attention_mask=mask, pixel_values=turn["pixel_values"],
                       cache=first.cache, labels=labels)
        kept = [k.tolist() for k in handle.kept_indices]
    # FasterVLM's default layer: the one producing hidden_states[-2], the last but one
    scores = eager_cls_scores(model, turn["pixel_values"], [model.config.vision_config.num_hidden_layers - 2])
    assert kept == top_k_sorted(scores, keep)
    features = image_features(model, torch.cat([inputs["pixel_values"], turn["pixel_values"]]))
    n_first = features[0].shape[0]
    want = reference_logits(model, ids[0], [features[0], features[1][kept[0]]], [list(range(n_first)), kept[0]],
                            "renumber")
    n_kept = new.shape[1] - features[1].shape[0] + keep
    assert second.logits.shape[1] == n_kept
    torch.testing.assert_close(second.logits[0, -1], want[-1], rtol=1e-4, atol=1e-4)
    # the loss on the new turn's kept columns: text labels, -100 at the image's kept tokens
    is_image = new[0] == model.config.image_token_id
    columns = torch.cat([(~is_image).nonzero().flatten(), is_image.nonzero().flatten()[kept[0]]]).sort().values
    kept_labels = labels[0][columns]
    want_loss = torch.nn.functional.cross_entropy(want[-n_kept:-1].float(), kept_labels[1:], ignore_index=-100)
    torch.testing.assert_close(second.loss, want_loss, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method, options", [("cls_attention", {}), ("fastv", {"layer": 1})])
def test_a_new_image_on_the_cache_misuse_is_refused(method, options):
    """A mask that fits neither the conversation nor the cache is a ValueError; a static cache,
    or Qwen (M-RoPE positions of a new image after cached tokens), is a NotImplementedError
    naming the alternative -- for both engines."""
    model, processor = BUILD["llava"]()
    inputs = two_prompts("llava", processor)
    turn = _new_turn(processor, 2, "llava")
    with vlm_prune.pruned(model, method, 0.25, **options):
        first = _generate(model, inputs)
        ids, mask = _conversation(inputs, first, turn)
        with pytest.raises(ValueError, match="attention_mask has"):
            with torch.no_grad():
                model(input_ids=ids[:, first.sequences.shape[1] - 1:], attention_mask=mask[:, 1:],
                      pixel_values=turn["pixel_values"], cache=first.cache)
        static = _generate(model, inputs, cache_implementation="static")
        with pytest.raises(NotImplementedError, match="static cache"):
            _generate(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": turn["pixel_values"]},
                      cache=static.cache)
    qwen, qwen_processor = BUILD["qwen2_vl"]()
    batch = two_prompts("qwen2_vl", qwen_processor)
    with vlm_prune.pruned(qwen, method, 0.25, **options):
        first = _generate(qwen, batch)
        with pytest.raises(NotImplementedError, match="M-RoPE positions of a new image"):
            with torch.no_grad():
                qwen(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                     image_grid_thw=batch["image_grid_thw"], cache=first.cache)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_in_llm_pruning_of_a_new_image_continues_the_pruned_cache(family):
    """transition with TTV alone scores a token by its own hidden-state transitions, which
    causality makes the same whatever follows it: the first turn pruned, then a turn with a new
    image on its cache, gives the logits and the kept tokens of a fresh pruned prefill of the
    whole conversation, at every stage of the schedule (a padded batch of two; on LLaVA-NeXT
    its rows keep different counts), and so does a text-only third turn -- with the default
    renumbered positions (the new tokens at stage s: their positions minus every token stage s
    dropped, the first turn's included).
    Up to the TTV softmax's normalisation, which also sees the tokens after a token: the
    release's softmax over the whole sequence (the default) gives the first image's tokens
    other weights in a prefill of the whole conversation than in the first turn (a prompt
    here keeps another token). So this runs with ttv_softmax="visual": there the tokens the
    whole conversation adds to a softmax are the second image's, which shift the attention's
    and the FFN's softmax nearly alike, and the first turn's choice stands on these prompts."""
    model, processor = BUILD[family](text_layers=4)
    inputs = two_prompts(family, processor)
    with vlm_prune.pruned(model, "transition", 0.25, alpha=1.0, ttv_softmax="visual") as handle:
        assert handle._patch.renumber
        first = _generate(model, inputs)
        lengths = handle.layer_lengths
        assert lengths[-1] < lengths[1] < lengths[0]  # two stages
        turn = _new_turn(processor, 2, family)
        ids, mask = _conversation(inputs, first, turn)
        before = [layer.keys.shape[2] for layer in first.cache.layers]
        second = _generate(model, {"input_ids": ids, "attention_mask": mask,
                                   **{k: turn[k] for k in IMAGE_KEYS if k in turn}}, cache=first.cache)
        new_kept = handle.kept_indices
        if family == "llava":  # each layer holds as many of the new image's tokens as of the first (64 each)
            grown = [layer.keys.shape[2] - n - 2 for layer, n in zip(second.cache.layers, before)]  # minus 2 decoded
            assert grown == [turn["input_ids"].shape[1] + 1 - (lengths[0] - n) for n in lengths]
        whole = {"input_ids": ids, "attention_mask": mask, "position_ids": _generate_positions(mask),
                 **{k: _interleave(inputs[k], turn[k]) for k in IMAGE_KEYS if k in turn}}
        with torch.no_grad():
            want = model(**whole).logits[:, -1]
        assert all(torch.equal(a, b) for a, b in zip(new_kept, handle.kept_indices[1::2]))
        torch.testing.assert_close(second.logits[0], want, rtol=1e-4, atol=1e-4)
        _check_a_text_turn_after(model, processor, second.sequences, mask, whole, second.cache)


def _sharpen_every_other_head(model) -> None:
    """Random weights attend almost uniformly, so every head gives the cached tokens the same
    share and scores that left them out of the softmax would rank alike; peaked heads beside
    flat ones make that share differ between heads."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            weight = layer.self_attn.q_proj.weight
            heads = weight.view(-1, layer.self_attn.head_dim, weight.shape[1])
            heads[1::2] *= 41


@pytest.mark.parametrize("method, options", [("fastv", {"layer": 2}), ("transition", {})])
def test_in_llm_scores_of_a_new_image_read_the_cached_tokens_too(method, options):
    """A text-only first turn, then a turn with an image on its cache: fastv's last-token
    attention and transition's instruction attention over the whole conversation (the cached
    keys in each softmax) give the kept tokens and logits of a fresh prefill of it all."""
    model, processor = BUILD["llava"](text_layers=4, seed=1)
    _sharpen_every_other_head(model)
    text = processor.tokenizer(["USER: Hello, I will show you some pictures. ASSISTANT: Sure.",
                                "USER: Hi. ASSISTANT: Hello."], return_tensors="pt", padding=True)
    with vlm_prune.pruned(model, method, 0.25, **options) as handle:
        first = _generate(model, text)
        turn = _new_turn(processor, 2, "llava")
        ids, mask = _conversation(text, first, turn)
        second = _generate(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": turn["pixel_values"]},
                           cache=first.cache)
        new_kept = handle.kept_indices
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, position_ids=_generate_positions(mask),
                         pixel_values=turn["pixel_values"]).logits[:, -1]
        assert all(torch.equal(a, b) for a, b in zip(new_kept, handle.kept_indices))
        assert handle.layer_lengths[-1] < handle.layer_lengths[0]
    torch.testing.assert_close(second.logits[0], want, rtol=1e-4, atol=1e-4)
