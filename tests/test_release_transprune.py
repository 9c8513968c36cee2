"""`transition` against an independent reference of TransPrune's released rules.

Release: github liaolea/TransPrune @ c9e8284f5808f7692c40590ffc99537e9220a01d,
llava/model/modeling_llama_transprune.py (transprune_forward, transprune_rank_drop,
LlamaDecoderLayer_TransPrune.compute_transf_weight). `release_reference` below re-derives it
from those rules for one prompt (batch 1, as the release runs): it embeds the prompt with the
unpatched model, then calls the decoder layers one by one with explicit position ids,
position embeddings and masks --
  * TTV of every layer from the first to the last pruning layer: for the attention and the FFN,
    ||out|| / ||in|| times the softmax of 1 - cos(in, out) over the WHOLE current sequence;
    stored per layer, gathered to the survivors at each stage, summed at each stage;
  * IGA of a stage after layer l: layer l+1's input_layernorm, q_proj, k_proj on layer l's
    output, RoPE at the current positions, causal softmax over every key, mean over heads,
    image columns, mean over the rows after the image (to the end of the prompt);
  * score = TTV / (sum + 1e-8) + IGA / (sum + 1e-8); the top int(N * ratio) tokens stay, sorted;
  * after each stage the sequence is renumbered 0..L'-1.
No vlm_prune code runs in it. The patched model (public API) must keep the same tokens and
give the same logits. The options that restore vlm_prune's earlier behaviour are checked
against the same reference with the matching rule switched.

The tiny models' random attention is near-uniform, which would hide a wrong IGA layer or wrong
positions: `sharpen` scales every q_proj / k_proj (logits x f^2, per head differently), so the
kept sets depend on them. Checked when this file was written: reverting any one default in the
engine (IGA from the pruning layer, TTV softmax over the visual tokens, original positions,
decode steps at original positions, rounded stage budgets) fails tests here.
"""

from __future__ import annotations

import math

import pytest
import torch

import vlm_prune
from vlm_prune import tiny

SCHEDULE = [(1, 0.75), (2, 0.5), (3, None)]  # on a 4-layer decoder: stages after layers 1, 2 and 3
LLAVA_PROMPT = "USER: <image>\nHow many green triangles are there? Answer the question using a single word. ASSISTANT:"
LLAVA_PROMPT_2 = "USER: <image>\nWhat colour is the shape at the top left? ASSISTANT:"
QUESTION = "How many green triangles are there? Answer using a single word."


class _Stop(Exception):
    pass


def sharpen(model, factor: float = 3.0) -> None:
    """Peaked attention: q and k of every LLM layer scaled by factor, times 1..2 per head."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj):
                heads = proj.weight.view(-1, attn.head_dim, proj.weight.shape[1])
                scale = factor * torch.linspace(1.0, 2.0, heads.shape[0])
                heads.mul_(scale[:, None, None])
                if proj.bias is not None:
                    proj.bias.view(-1, attn.head_dim).mul_(scale[:, None])


def _embedded(model, inputs):
    """The language model's inputs_embeds and position ids from the unpatched model."""
    lm = model.model.language_model
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)
        raise _Stop

    hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    except _Stop:
        pass
    finally:
        hook.remove()
    embeds = seen["inputs_embeds"]
    positions = seen.get("position_ids")
    if positions is None:
        positions = torch.arange(embeds.shape[1])[None]
    if positions.dim() == 3 and positions.shape[0] == 4:  # Qwen: text positions first
        positions = positions[1:]
    return embeds, positions


def _rotate(x, cos, sin):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]


def _ttv_part(t_in, t_out, domain):
    """||out|| / ||in|| * softmax over `domain` ([L] bool) of 1 - cos(in, out); [L]."""
    t_in, t_out = t_in[0].float(), t_out[0].float()
    change = 1 - torch.nn.functional.cosine_similarity(t_in, t_out, dim=-1, eps=1e-8)
    weights = torch.zeros_like(change)
    weights[domain] = torch.exp(change[domain]) / torch.exp(change[domain]).sum()
    return t_out.norm(dim=-1) / t_in.norm(dim=-1) * weights


def release_reference(model, inputs, schedule, keep, iga="next", softmax="sequence", renumber=True):
    """(kept image-token indices, logits [1, L', V]) of one prompt pruned by the release's rules.

    schedule: [(after_layer, ratio), ...], the last ratio None (= `keep`: an int, or a fraction
    rounded to the nearest count). iga "own", softmax "visual", renumber False switch the rule
    to the option's."""
    lm = model.model.language_model
    ids = inputs["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().flatten()
    start, n_image = int(image[0]), len(image)
    assert image.tolist() == list(range(start, start + n_image)), "one contiguous image span"
    stage_after = {after - 1: ratio for after, ratio in schedule}  # 0-based layer whose output is pruned
    window = range(schedule[0][0] - 1, schedule[-1][0])
    with torch.no_grad():
        hidden, positions = _embedded(model, inputs)
        columns = torch.arange(hidden.shape[1])
        n_now, stored = n_image, []
        for i, layer in enumerate(lm.layers):
            length = hidden.shape[1]
            cos, sin = lm.rotary_emb(hidden, positions)
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            seen = {}
            hooks = [layer.self_attn.register_forward_hook(
                         lambda m, a, kw, out: seen.update(attn=(kw["hidden_states"], out[0])), with_kwargs=True),
                     layer.mlp.register_forward_hook(lambda m, a, out: seen.update(mlp=(a[0], out)))]
            layer_input = hidden
            hidden = layer(hidden, attention_mask=causal[None, None], position_embeddings=(cos, sin),
                           position_ids=positions if positions.dim() == 2 else None)
            for hook in hooks:
                hook.remove()
            if i in window:
                domain = torch.zeros(length, dtype=torch.bool)
                if softmax == "sequence":
                    domain[:] = True
                else:
                    domain[start:start + n_now] = True
                stored.append(_ttv_part(*seen["attn"], domain) + _ttv_part(*seen["mlp"], domain))
            if i not in stage_after:
                continue
            ratio = stage_after[i]
            if ratio is not None:
                n_keep = int(n_image * ratio)
            else:
                n_keep = keep if isinstance(keep, int) else max(1, math.floor(keep * n_image + 0.5))
            # IGA
            if iga == "next":
                scorer, x = lm.layers[i + 1], hidden
            else:
                scorer, x = layer, layer_input
            attn = scorer.self_attn
            normed = scorer.input_layernorm(x)
            head_dim = attn.head_dim
            q = attn.q_proj(normed).view(1, length, -1, head_dim).transpose(1, 2)
            k = attn.k_proj(normed).view(1, length, -1, head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(head_dim)
            probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1, dtype=torch.float32)
            iga_score = probs[0].mean(0)[start + n_now:, start:start + n_now].mean(0)
            ttv_score = sum(stored)[start:start + n_now]
            score = ttv_score / (ttv_score.sum() + 1e-8) + iga_score / (iga_score.sum() + 1e-8)
            top = score.topk(n_keep).indices.sort().values + start
            keep_slots = torch.cat([torch.arange(start), top, torch.arange(start + n_now, length)])
            hidden, columns = hidden[:, keep_slots], columns[keep_slots]
            stored = [t[keep_slots] for t in stored]
            if renumber:
                positions = torch.arange(len(keep_slots))[None]
            else:
                positions = positions[..., keep_slots]
            n_now = n_keep
        logits = model.lm_head(lm.norm(hidden))
    return columns[start:start + n_now] - start, logits


def patched(model, inputs, keep, **options):
    """(kept indices of the one image, logits) through the public API."""
    return kept_and_logits(model, inputs, "transition", keep, schedule=SCHEDULE, **options)


def kept_and_logits(model, inputs, method, keep, **options):
    """(kept indices of the prompt's one image, logits) of `method` through the public API."""
    with vlm_prune.pruned(model, method, keep, **options) as handle:
        with torch.no_grad():
            out = model(**inputs).logits
        (kept,) = handle.kept_indices
    return kept, out


@pytest.fixture(scope="module")
def llava4():
    model, processor = tiny.llava(text_layers=4, seed=3)
    sharpen(model)
    return model, processor


@pytest.fixture(scope="module")
def next4():
    model, processor = tiny.llava_next(text_layers=4, seed=3)
    sharpen(model)
    return model, processor


@pytest.fixture(scope="module")
def qwen4():
    model, processor = tiny.qwen2_vl(text_layers=4, seed=3)
    sharpen(model)
    return model, processor


def llava_prompt(processor, text=LLAVA_PROMPT, size=(90, 120), seed=0):
    return processor(images=[tiny.random_image(*size, seed=seed)], text=[text], return_tensors="pt")


def next_prompt(processor, size=(280, 196), seed=0):
    return processor(images=[tiny.random_image(*size, seed=seed)], text=[f"USER: <image>\n{QUESTION} ASSISTANT:"],
                     return_tensors="pt")


def qwen_prompt(processor, size=(280, 196), seed=0):
    return processor(images=[tiny.random_image(*size, seed=seed)], text=[tiny.qwen_prompt(QUESTION)],
                     return_tensors="pt")


def _check(model, inputs, keep, reference_options=None, **options):
    kept, out = patched(model, inputs, keep, **options)
    want_kept, want = release_reference(model, inputs, SCHEDULE, keep, **(reference_options or {}))
    assert kept.tolist() == want_kept.tolist()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    return kept, out


# -- the default is the release --------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_llava_equals_the_release(llava4, seed):
    model, processor = llava4
    _check(model, llava_prompt(processor, seed=seed), 12)


def test_llava_next_equals_the_release(next4):
    """The whole anyres span (base, crops, newline tokens) is one pool; N * 0.75 and N * 0.5
    are not whole here, so the intermediate stages floor as the release's int() does."""
    model, processor = next4
    inputs = next_prompt(processor)
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert (n_image * 0.75) % 1 == 0.5  # int() keeps 52 of 70 where rounding would keep 53
    kept, _ = _check(model, inputs, 0.25)
    assert len(kept) == max(1, math.floor(0.25 * n_image + 0.5))


def test_qwen2_vl_equals_the_release_with_original_positions(qwen4):
    """M-RoPE: kept tokens keep their 3-D positions (the default there); renumbering is refused."""
    model, processor = qwen4
    _check(model, qwen_prompt(processor), 10, reference_options={"renumber": False})
    with pytest.raises(ValueError, match="positions='renumber' is not supported on Qwen2VL"):
        vlm_prune.patch(model, "transition", 10, positions="renumber")
    assert vlm_prune.get_handle(model) is None


def test_the_released_schedule_budgets():
    """576 visual tokens: 504, 360, then `keep` (72 at 0.125); on 32 layers after 7, 9, 12."""
    from vlm_prune.methods.transition import Transition

    method, options = Transition(), Transition.validate_options({})
    stages = method.stages(options, 0.125, 32)
    assert [s.after_layer for s in stages] == [7, 9, 12]
    assert [method.budget(s, stages, 0.125, 576) for s in range(3)] == [504, 360, 72]
    assert [method.budget(s, stages, 0.125, 2340) for s in range(3)] == [2047, 1462, 293]  # int(); round(292.5)
    assert [method.budget(s, stages, 64, 7) for s in range(3)] == [7, 7, 7]


# -- each option gives back the earlier behaviour ------------------------------------------------


@pytest.mark.parametrize("option, rule", [
    ({"iga_layer": "own"}, {"iga": "own"}),
    ({"ttv_softmax": "visual"}, {"softmax": "visual"}),
    ({"positions": "original"}, {"renumber": False}),
])
def test_each_option_is_the_rule_it_names(llava4, option, rule):
    """Each option equals the reference with that one rule switched, and changes what the
    default gives on this prompt (kept tokens or logits)."""
    model, processor = llava4
    inputs = llava_prompt(processor)
    kept, out = _check(model, inputs, 12, reference_options=rule, **option)
    default_kept, default = patched(model, inputs, 12)
    assert kept.tolist() != default_kept.tolist() or not torch.allclose(out, default, rtol=1e-4, atol=1e-4)
    if "positions" not in option:  # the signal options change the kept tokens themselves
        assert kept.tolist() != default_kept.tolist()


# -- generate, batches --------------------------------------------------------------------------


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, suppress_tokens=[model.config.image_token_id], **kw)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_renumbered_generate_with_cache_equals_without(llava4, next4, family):
    """Decode steps on the pruned dynamic or static cache see the renumbered positions the
    no-cache replays give every token (logits of every step to 1e-5), for a padded batch."""
    model, processor = llava4 if family == "llava" else next4
    if family == "llava":
        images = [tiny.random_image(90, 120, seed=0), tiny.random_image(64, 48, seed=1)]
        inputs = processor(images=images, text=[LLAVA_PROMPT, LLAVA_PROMPT_2], return_tensors="pt", padding=True)
    else:
        images = [tiny.random_image(280, 196, seed=0), tiny.random_image(100, 300, seed=1)]
        texts = [f"USER: <image>\n{QUESTION} ASSISTANT:", "USER: <image>\nWhat is it? ASSISTANT:"]
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with vlm_prune.pruned(model, "transition", 0.25, schedule=SCHEDULE) as handle:
        assert handle._patch.renumber
        cached = _generate(model, inputs)
        replayed = _generate(model, inputs, use_cache=False)
        static = _generate(model, inputs, cache_implementation="static")
    for other in (replayed, static):
        assert torch.equal(other.sequences, cached.sequences)
        for got, want in zip(other.logits, cached.logits):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_each_row_alone(next4):
    """Rows of different lengths whose images keep different counts: each row is pruned (TTV
    softmax over its own real tokens, renumbered positions) as it is alone."""
    model, processor = next4
    images = [tiny.random_image(280, 196, seed=0), tiny.random_image(100, 300, seed=1)]
    texts = [f"USER: <image>\n{QUESTION} ASSISTANT:", "USER: <image>\nWhat is it? ASSISTANT:"]
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with vlm_prune.pruned(model, "transition", 0.25, schedule=SCHEDULE) as handle:
        with torch.no_grad():
            batch_last = model(**batch).logits[:, -1]
        batch_kept = handle.kept_indices
        batch_gen = _generate(model, batch)
        assert len(batch_kept[0]) != len(batch_kept[1])
        for row in range(2):
            alone = processor(images=[images[row]], text=[texts[row]], return_tensors="pt")
            with torch.no_grad():
                alone_last = model(**alone).logits[0, -1]
            assert handle.kept_indices[0].tolist() == batch_kept[row].tolist()
            torch.testing.assert_close(alone_last, batch_last[row], rtol=1e-5, atol=1e-5)
            alone_gen = _generate(model, alone)
            n_new = len(alone_gen.logits)
            assert torch.equal(alone_gen.sequences[0, -n_new:], batch_gen.sequences[row, -n_new:])
            for got, want in zip(alone_gen.logits, batch_gen.logits):
                torch.testing.assert_close(got[0], want[row], rtol=1e-4, atol=1e-5)
        # and the batch's first row is the release's
        alone = processor(images=[images[0]], text=[texts[0]], return_tensors="pt")
    want_kept, _ = release_reference(model, alone, SCHEDULE, 0.25)
    assert batch_kept[0].tolist() == want_kept.tolist()


def test_a_cache_pruned_with_other_positions_is_refused(llava4):
    """Layers after a stage hold keys at renumbered or original positions: a cache filled under
    one policy decoded under the other would misplace every new token; it is a clear error."""
    model, processor = llava4
    inputs = llava_prompt(processor)
    step = {"input_ids": torch.tensor([[7]]), "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + 1,
                                                                         dtype=torch.long)}
    with torch.no_grad():
        with vlm_prune.pruned(model, "transition", 12, schedule=SCHEDULE):
            cache = model(**inputs).cache
        with vlm_prune.pruned(model, "transition", 12, schedule=SCHEDULE, positions="original"):
            with pytest.raises(ValueError, match="another configuration"):
                model(**step, cache=cache)
