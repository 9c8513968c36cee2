"""`visiondrop` against an independent reference of VisionDrop's released rules.

Release: github Ruixxxx/VisionDrop @ f7a944497d581aa79570f8f79e8ca91b5347a52f,
llava/model/modeling_llama_visiondrop.py (visiondrop_forward, visiondrop_rank_drop) and
llava/visionzip (the vision-encoder stage). `release_reference` re-derives the LLM stages from
those rules for one prompt (batch 1, as the release runs), calling the decoder layers one by one:
  * a stage after layer l scores with layer l+1's input_layernorm, q_proj, k_proj on layer l's
    output, RoPE at the current positions: the image's rows, causal softmax over every key in
    fp32, mean over heads, the image's columns, mean over the rows;
  * the top D tokens stay; the others (in order) are candidates, every step-th a target
    (step = max(1, R // C), the first C), each other joins the target with the most similar
    key (keys after RoPE averaged over key heads, L2-normalised); target + mean of its joiners;
  * the sequence is renumbered 0..L'-1 after each stage.
No vlm_prune code runs in it; the only departure is the one the method documents (kept tokens
in their sequence order, `order="raster"`). The vision-encoder stage is vlm_prune's `visionzip`
(its own parity test: test_release_visionzip.py); here the preset must equal that pipeline.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import vlm_prune
from vlm_prune import tiny
from vlm_prune.methods.visiondrop import VisionDrop

from .test_release_transprune import (LLAVA_PROMPT, QUESTION, _embedded, _rotate, kept_and_logits,  # noqa: F401
                                      llava4, qwen4)  # (fixtures)


def _counts(n_image: int, keep: int) -> list[tuple[int, int]]:
    """The release's (kept, contextual) per stage on a 4-layer decoder (stages after 1, 2, 3)."""
    kept = [n_image * 35 // 48, n_image * 26 // 48, keep]
    shares = [Fraction(5, 35), Fraction(4, 26), Fraction(3, 19)]
    return [(k, int(k * share + Fraction(1, 2))) for k, share in zip(kept, shares)]


def release_reference(model, inputs, keep, renumber=True):
    """(kept image-token indices, logits) of one prompt through the release's LLM stages."""
    lm = model.model.language_model
    ids = inputs["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().flatten()
    start, n_image = int(image[0]), len(image)
    counts = dict(zip((0, 1, 2), _counts(n_image, keep)))  # 0-based layer whose output is pruned
    with torch.no_grad():
        hidden, positions = _embedded(model, inputs)
        columns = torch.arange(hidden.shape[1])
        n_now = n_image
        for i, layer in enumerate(lm.layers):
            length = hidden.shape[1]
            cos, sin = lm.rotary_emb(hidden, positions)
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            hidden = layer(hidden, attention_mask=causal[None, None], position_embeddings=(cos, sin),
                           position_ids=positions if positions.dim() == 2 else None)
            if i not in counts:
                continue
            n_keep, n_context = counts[i]
            scorer = lm.layers[i + 1].self_attn
            normed = lm.layers[i + 1].input_layernorm(hidden)
            head_dim = scorer.head_dim
            q = scorer.q_proj(normed).view(1, length, -1, head_dim).transpose(1, 2)
            k = scorer.k_proj(normed).view(1, length, -1, head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            metric = k[0].mean(0)[start:start + n_now]  # keys averaged over key heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(head_dim)
            probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1, dtype=torch.float32)
            span = slice(start, start + n_now)
            score = probs[0].mean(0)[span, span].mean(0)
            n_dominant = n_keep - n_context
            dominant = score.topk(n_dominant).indices
            rest = [j for j in range(n_now) if j not in set(dominant.tolist())]
            step = max(1, len(rest) // n_context)
            targets = rest[::step][:n_context]
            others = [j for j in rest if j not in targets]
            unit = metric.float() / metric.float().norm(dim=-1, keepdim=True)
            image_hidden = hidden[0, span].float()
            merged = {}
            for t in targets:
                merged[t] = [image_hidden[t]]
            for j in others:
                best = max(range(len(targets)), key=lambda c: (float(unit[j] @ unit[targets[c]]), -c))
                merged[targets[best]].append(image_hidden[j])
            new_hidden = hidden.clone()
            for t, parts in merged.items():
                extra = torch.stack(parts[1:]).mean(0) if len(parts) > 1 else 0.0
                new_hidden[0, start + t] = (parts[0] + extra).to(hidden.dtype)
            kept = sorted(dominant.tolist() + targets)  # the documented departure: sequence order
            keep_slots = torch.cat([torch.arange(start), torch.tensor(kept) + start, torch.arange(start + n_now, length)])
            hidden, columns = new_hidden[:, keep_slots], columns[keep_slots]
            positions = torch.arange(len(keep_slots))[None] if renumber else positions[..., keep_slots]
            n_now = n_keep
        logits = model.lm_head(lm.norm(hidden))
    return columns[start:start + n_now] - start, logits


def _patched(model, inputs, keep, **options):
    return kept_and_logits(model, inputs, "visiondrop", keep, vision_stage=False, **options)


@pytest.mark.parametrize("seed, keep", [(0, 12), (1, 9), (2, 20)])
def test_llava_llm_stages_equal_the_release(llava4, seed, keep):
    model, processor = llava4
    inputs = processor(images=[tiny.random_image(90, 120, seed=seed)], text=[LLAVA_PROMPT], return_tensors="pt")
    kept, out = _patched(model, inputs, keep)
    want_kept, want = release_reference(model, inputs, keep)
    assert kept.tolist() == want_kept.tolist()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_qwen2_vl_with_original_positions_equals_the_release_rules(qwen4):
    model, processor = qwen4
    inputs = processor(images=[tiny.random_image(280, 196, seed=0)], text=[tiny.qwen_prompt(QUESTION)],
                       return_tensors="pt")
    kept, out = _patched(model, inputs, 10)
    want_kept, want = release_reference(model, inputs, 10, renumber=False)
    assert kept.tolist() == want_kept.tolist()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_the_released_budgets():
    """keep=19 on 32 layers: VisionZip 42 + 6, then 30 + 5, 22 + 4, 16 + 3 after layers 8, 16, 24."""
    method = VisionDrop()
    options = {"vision_stage": False, "schedule": None, "contextual": None}
    stages = method.stages(options, 19, 32)
    assert [s.after_layer for s in stages] == [8, 16, 24]
    budgets = [method.budget(s, stages, 19, 48) for s in range(3)]
    assert budgets == [35, 26, 19]
    assert [method.contextual(s, stages, b, options) for s, b in enumerate(budgets)] == [5, 4, 3]
    vision, llm = method.preset(vlm_prune.PruneConfig.from_kwargs("visiondrop", 19))
    assert (vision.method, vision.keep, llm.keep) == ("visionzip", 48, 19)
    from vlm_prune.methods.visionzip import _contextual_of

    assert _contextual_of(48, vision.options["contextual"]) == 6


def test_patched_alone_is_visionzip_then_the_llm_stages(llava4):
    """The preset equals the explicit pipeline of its two parts (token for token)."""
    model, processor = llava4
    inputs = processor(images=[tiny.random_image(90, 120, seed=4)], text=[LLAVA_PROMPT], return_tensors="pt")
    with torch.no_grad():
        with vlm_prune.pruned(model, "visiondrop", 8) as handle:
            alone, stats = model(**inputs).logits, handle.stats
        with vlm_prune.pruned(model, "visionzip:20:contextual=0.125+visiondrop:8:vision_stage=false") as handle:
            piped = model(**inputs).logits
    torch.testing.assert_close(alone, piped, rtol=0, atol=0)
    assert [(s["visual_tokens"], s["after_vision"], s["kept"]) for s in stats] == [(64, 20, 8)]


def test_generate_with_cache_equals_without_and_batch_equals_rows(llava4):
    model, processor = llava4
    prompts = [LLAVA_PROMPT, "USER: <image>\nWhat colour is it? ASSISTANT:"]
    images = [tiny.random_image(90, 120, seed=5), tiny.random_image(90, 120, seed=6)]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), vlm_prune.pruned(model, "visiondrop", 10):
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
        rows = [model.generate(**processor(images=[im], text=[p], return_tensors="pt"), max_new_tokens=4,
                               do_sample=False)[0, -4:] for im, p in zip(images, prompts)]
    assert cached.tolist() == uncached.tolist()
    assert [r.tolist() for r in rows] == cached[:, -4:].tolist()


def test_bad_options_name_the_value(llava4):
    model, _ = llava4
    with pytest.raises(ValueError, match="contextual=1.5"):
        vlm_prune.patch(model, "visiondrop", 8, contextual=1.5)
    with pytest.raises(ValueError, match="vision_stage=True applies when it is patched alone"):
        vlm_prune.patch(model, "cls_attention:32+visiondrop:8:vision_stage=true")
    assert vlm_prune.get_handle(model) is None
