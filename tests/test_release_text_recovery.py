"""`text_recovery` equals Recoverable Compression's release (github banjiuyufen/Recoverable-Compression
@ d927594, clip_encoder.py `token_recycling_with_text_in_vision_and_clustring`) with its documented
fixes, checked against a reference written here from the release's rules with none of vlm_prune's
code: the last layer's [CLS] row as one head over the full width, local outlier factor counts
(scikit-learn's definition, written out as loops), recovery by the question, centres that absorb
their 32 nearest remaining tokens, a summary token; the LLM gets kept + recovered (raster),
centres (descending score), summary -- all before the projector."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vlm_prune
from vlm_prune import tiny

from .reference import reference_logits


def lof_by_loops(values: list[float], k: int) -> list[float]:
    """scikit-learn's LocalOutlierFactor on 1-D points: k nearest others (ties to the lower index),
    reachability max(k-distance(o), d(p, o)), lrd = 1 / (mean reach + 1e-10), LOF = mean lrd of the
    neighbours / own lrd."""
    n = len(values)
    k = min(k, n - 1)
    near = [sorted((j for j in range(n) if j != i), key=lambda j: (abs(values[i] - values[j]), j))[:k] for i in range(n)]
    k_dist = [abs(values[i] - values[near[i][-1]]) for i in range(n)]
    lrd = [1 / (sum(max(k_dist[o], abs(values[i] - values[o])) for o in near[i]) / k + 1e-10) for i in range(n)]
    return [sum(lrd[o] for o in near[i]) / k / lrd[i] for i in range(n)]


def count_of(values: list[float], k: int) -> int:
    """The release's count: the fraction of LOF outliers (contamination 'auto': LOF > 1.5) times N."""
    n = len(values)
    outliers = sum(f > 1.5 for f in lof_by_loops(values, k))
    return int(n * (outliers / n))


def release_reference(model, inputs, keep: int):
    """(kept + merged features in the LLM's order, counts) for one LLaVA prompt."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_hidden_states=True)
        last = tower.vision_model.encoder.layers[-1] if hasattr(tower, "vision_model") else tower.encoder.layers[-1]
        x = last.layer_norm1(out.hidden_states[-2])
        q, k = last.self_attn.q_proj(x)[0], last.self_attn.k_proj(x)[0]  # raw projections, full width
        attention = torch.softmax(q[0] @ k.T / math.sqrt(q.shape[-1]), -1)[1:]  # one head, [CLS] column dropped
        keys = k[1:]
        feats = out.hidden_states[model.config.vision_feature_layer][0, 1:]  # the LLM's features, before the projector
        projected = model.model.multi_modal_projector(feats)
        ids = inputs["input_ids"][0]
        image = (ids == model.config.image_token_id).nonzero().flatten()
        question = model.model.get_input_embeddings()(ids[image[-1] + 1:]).mean(0)
    n = feats.shape[0]
    s = F.cosine_similarity(projected, question[None], dim=-1)
    a = attention.tolist()
    n_v = count_of(a, 20)
    visual = sorted(range(n), key=lambda j: -a[j])[:n_v]
    marked = s.clone()
    marked[visual] = s.min()
    n_t = int((n - n_v) * (count_of(marked.tolist(), 20) / n))
    recovered = sorted((j for j in range(n) if j not in visual), key=lambda j: -float(marked[j]))[:n_t]
    kept = sorted(visual + recovered)
    rest = [j for j in range(n) if j not in kept]
    n_c = count_of([a[j] for j in rest], 10)
    assert n_v + n_t + n_c + 1 <= keep  # the test runs uncapped
    centres = sorted(rest, key=lambda j: -a[j])[:n_c]
    unit = F.normalize(keys, dim=-1)
    merged = []
    for c in centres:
        others = [j for j in centres if j != c] + [j for j in rest if j not in centres]
        affinity = torch.stack([unit[c] @ unit[j] + 50 / math.sqrt(768) * s[j] for j in others])
        members = [others[i] for i in affinity.topk(min(32, len(others))).indices.tolist()]
        w = attention[members]
        merged.append(feats[c] + (w[:, None] * feats[members]).sum(0) / w.sum())
    plain = [j for j in rest if j not in centres]
    w = attention[plain]
    summary = (w[:, None] * feats[plain]).sum(0) / w.sum()
    tokens = torch.cat([feats[kept], torch.stack(merged), summary[None]]) if centres else feats[kept]
    slots = kept + centres + ([plain[int(w.argmax())]] if centres else [])
    return tokens, slots, (n_v, n_t, n_c)


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny.llava(seed=1)
    yield model, processor
    vlm_prune.unpatch(model)


@pytest.mark.parametrize("seed", [0, 7])
def test_llava_equals_the_release(llava, seed):
    model, processor = llava
    prompt = "USER: <image>\nHow many red circles are in the picture? ASSISTANT:"
    inputs = processor(images=[tiny.random_image(150, 110, seed=seed)], text=[prompt], return_tensors="pt")
    tokens, slots, counts = release_reference(model, inputs, keep=40)
    assert all(c > 0 for c in counts), counts  # every step does something on this input
    with torch.no_grad():
        features = model.model.multi_modal_projector(tokens)
    handle = vlm_prune.patch(model, "text_recovery", 40)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    assert handle.kept_indices[0].tolist() == sorted(slots)
    assert handle.stats[0]["kept"] == len(slots)
    expected = reference_logits(model, inputs["input_ids"][0], [features], [sorted(slots)], "renumber")
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # under original positions: the same tokens, each at the slot it stands for
    order = sorted(range(len(slots)), key=lambda i: slots[i])
    handle = vlm_prune.patch(model, "text_recovery", 40, positions="original")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    expected = reference_logits(model, inputs["input_ids"][0], [features[order]], [sorted(slots)], "original")
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_keep_caps_the_release_counts(llava):
    """A budget below the release's counts: centres go first, then recovered tokens."""
    model, processor = llava
    prompt = "USER: <image>\nHow many red circles are in the picture? ASSISTANT:"
    inputs = processor(images=[tiny.random_image(150, 110, seed=0)], text=[prompt], return_tensors="pt")
    _, slots, (n_v, n_t, n_c) = release_reference(model, inputs, keep=40)
    handle = vlm_prune.patch(model, "text_recovery", n_v + n_t)
    with torch.no_grad():
        model(**inputs)
    assert handle.stats[0]["kept"] == n_v + n_t  # no centre, so no summary either
    handle = vlm_prune.patch(model, "text_recovery", n_v)
    with torch.no_grad():
        model(**inputs)
    assert handle.stats[0]["kept"] == n_v


def test_lof_matches_scikit_learns_definition():
    from vlm_prune.methods.text_recovery import local_outlier_factor, outlier_count

    torch.manual_seed(0)
    values = torch.cat([torch.randn(40) * 0.1, torch.tensor([3.0, -2.5, 2.9])])
    ours = local_outlier_factor(values, 20).tolist()
    assert ours == pytest.approx(lof_by_loops(values.tolist(), 20), rel=1e-9)
    assert outlier_count(values, 20) == count_of(values.tolist(), 20)
    assert outlier_count(values, 20) >= 3  # both tails: -2.5 counts as well as 3.0 and 2.9
