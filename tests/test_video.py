"""Videos on Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 (transformers): every vision-stage method prunes
video tokens too, alone or with images in one prompt, per frame or per video, and `evs` (vLLM's
Efficient Video Sampling rule) keeps what vLLM's own function keeps.

References are built another way: the unpatched model (keep=1.0, unpatch), generate without a
cache, each row alone, the model's own M-RoPE index, the unpatched language model run on the
kept columns by hand, the EVS rule written out with loops, and vLLM's `compute_retention_mask`
itself (in the vLLM venv)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

import vlm_prune
from vlm_prune import tiny
from vlm_prune.config import PruneConfig
from vlm_prune.methods.evs import EVS
from vlm_prune.video_inputs import qwen_video_inputs

from .test_families import greedy, logits
from .test_qwen3_vl import assert_batch_equals_rows
from .test_vllm import ROOT, VLLM_PYTHON

VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]
# frame sizes: 4x3 merged tokens a frame (28 px per token on Qwen2-VL, 32 on Qwen3-VL)
FRAME = {"qwen2_vl": (112, 84), "qwen2_5_vl": (112, 84), "qwen3_vl": (128, 96), "qwen3_5": (128, 96)}
VISION = [("cls_attention", {}), ("random", {"seed": 2}), ("pool", {"positions": "original"}),
          ("dct", {"positions": "original"}), ("visionzip", {}), ("divprune", {}), ("text_recovery", {"mode": "fixed"}),
          ("evs", {}), ("cls_attention", {"video_budget": "per_video"}), ("divprune", {"video_budget": "per_video"})]


@pytest.fixture(scope="module")
def models():
    built = {"qwen2_vl": tiny.qwen2_vl(), "qwen2_5_vl": tiny.qwen2_vl(version="2.5", seed=1),
             "qwen3_vl": tiny.qwen3_vl(seed=2), "qwen3_5": tiny.qwen3_5(seed=3)}
    yield built
    for model, _ in built.values():
        vlm_prune.unpatch(model)


def frames(family, n, seed=0, still=False):
    """n frames; still=True: a scene that barely moves (EVS then drops most later frames)."""
    size = FRAME[family]
    if still:
        base = tiny.random_image(*size, seed=seed)
        return [base] * (n - 1) + [tiny.random_image(*size, seed=seed + 50)]
    return [tiny.random_image(*size, seed=seed + i) for i in range(n)]


def mixed_inputs(family, processor, rows=(0, 1)):
    """Row 0: a 6-frame video and a question; row 1: an image, then a 4-frame video."""
    prompts = [VIDEO + "What happens?", IMAGE + "and then" + VIDEO + "Which one moves?"]
    videos = [frames(family, 6, seed=0), frames(family, 4, seed=10)]
    images = [tiny.random_image(*FRAME[family][::-1], seed=7)]
    picked = [prompts[r] for r in rows]
    return qwen_video_inputs(processor, picked, [videos[r] for r in rows], images=images if 1 in rows else None)


def video_count(inputs, model):
    return (inputs["input_ids"] == model.config.video_token_id).sum(1).tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, options", VISION)
def test_keep_all_is_identity_and_cache_equals_no_cache(models, family, method, options):
    model, processor = models[family]
    inputs = mixed_inputs(family, processor)
    expected = logits(model, inputs)
    handle = vlm_prune.patch(model, method, 1.0, **options)
    try:
        assert torch.equal(logits(model, inputs), expected)
        assert [s["video_tokens"] for s in handle.stats] == video_count(inputs, model)
        vlm_prune.patch(model, method, 0.3, **options)
        handle = vlm_prune.get_handle(model)
        with_cache = greedy(model, inputs)
        assert all(s["video_kept"] < s["video_tokens"] for s in handle.stats)
        assert all(s["kept"] - s["video_kept"] <= s["visual_tokens"] - s["video_tokens"] for s in handle.stats)
        assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
        pruned = logits(model, inputs)
        assert torch.equal(with_cache[:, inputs["input_ids"].shape[1]], pruned[:, -1].argmax(-1))
        assert not torch.allclose(pruned[:, -1], expected[:, -1], atol=1e-4)  # pruning changes the output
    finally:
        vlm_prune.unpatch(model)
    assert torch.equal(logits(model, inputs), expected)  # unpatch restores


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, options", [("cls_attention", {}), ("pool", {"positions": "original"}), ("evs", {}),
                                             ("divprune", {"video_budget": "per_video"})])
def test_padded_batch_equals_rows_alone(models, family, method, options):
    model, processor = models[family]
    batch = mixed_inputs(family, processor)
    assert_batch_equals_rows(model, batch, lambda row: mixed_inputs(family, processor, rows=(row,)), method, 0.4,
                             options)


def rope_index(model, inputs):
    extra = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if k in inputs}
    with torch.no_grad():
        return model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                          attention_mask=inputs["attention_mask"], **extra)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_keep_the_unpruned_positions(models, family):
    """The language model gets the unpruned model's M-RoPE ids of the kept columns (video
    tokens, image tokens and text, Qwen3-VL's timestamp text included), on a padded batch."""
    model, processor = models[family]
    inputs = mixed_inputs(family, processor)
    expected = rope_index(model, inputs)
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(positions=kw["position_ids"]), with_kwargs=True)
    handle = vlm_prune.patch(model, "evs", 0.5)
    try:
        logits(model, inputs)
        columns = handle._patch.state.compaction.index
    finally:
        handle.remove()
        hook.remove()
    positions = seen["positions"][-3:]  # Qwen3-VL / generate() may put a text plane first
    for row in range(2):
        real = columns[row] >= 0
        assert torch.equal(positions[:, row, real], expected[:, row, columns[row, real]])


def evs_reference(features: torch.Tensor, t: int, keep: float) -> list[int]:
    """The EVS rule written out: per token, 1 - cos with the same place one frame earlier (255
    in the first frame), a stable descending ranking, max(frame, floor(N * keep)) kept."""
    n, _ = features.shape
    per_frame = n // t
    scores = []
    for i in range(n):
        if i < per_frame:
            scores.append(255.0)
        else:
            a, b = features[i], features[i - per_frame]
            scores.append(1 - float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    ranked = sorted(range(n), key=lambda i: -scores[i])  # Python's sort is stable
    count = max(per_frame, int(n * keep))
    return sorted(ranked[:count])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.7])
def test_evs_keeps_the_rules_tokens_and_the_model_sees_them_where_they_were(models, family, keep):
    """The kept video tokens are the rule's; the first frame is always kept whole; and the
    patched logits are the unpatched language model's on the kept columns at their positions."""
    model, processor = models[family]
    inputs = qwen_video_inputs(processor, [VIDEO + "What moves?"], [frames(family, 8, seed=3, still=True)])
    with torch.no_grad():
        feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                               return_dict=True).pooler_output[0]
    t = int(inputs["video_grid_thw"][0, 0])
    kept = evs_reference(feats, t, keep)
    assert set(range(feats.shape[0] // t)) <= set(kept)
    with vlm_prune.pruned(model, "evs", keep) as handle:
        out = logits(model, inputs)
        assert handle.kept_indices[0].tolist() == kept
        assert handle.stats[0]["video_kept"] == len(kept)
    # the reference: the unpatched language model on the kept columns, at the unpruned positions
    ids = inputs["input_ids"][0]
    is_video = ids == model.config.video_token_id
    keep_col = ~is_video
    keep_col[is_video.nonzero().flatten()[kept]] = True
    positions = rope_index(model, inputs)[:, :, keep_col]
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids[keep_col][None]).clone()
        embeds[0, is_video[keep_col]] = feats[kept]
        kwargs = {}
        if family == "qwen3_vl":  # its DeepStack levels at the kept video tokens
            levels = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                                    return_dict=True).deepstack_features
            kwargs = dict(visual_pos_masks=is_video[keep_col][None],
                          deepstack_visual_embeds=[level[0][kept] for level in levels])
        hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions, **kwargs).last_hidden_state
        expected = model.lm_head(hidden)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_evs_equals_vllms_own_retention_mask(models):
    """vLLM's `compute_retention_mask` (the CPU build in .venv-vllm) on the same video features
    keeps the same tokens as `evs`, for pruning rates q with keep = 1 - q."""
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    cases = []
    for family in FAMILIES:
        model, processor = models[family]
        for seed, still in [(3, True), (4, False)]:
            inputs = qwen_video_inputs(processor, [VIDEO + "?"], [frames(family, 8, seed=seed, still=still)])
            with torch.no_grad():
                feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                                       return_dict=True).pooler_output[0]
            thw = inputs["video_grid_thw"][0].tolist()
            for q in (0.3, 0.5, 0.75, 0.9):
                with vlm_prune.pruned(model, "evs", 1 - q) as handle:
                    logits(model, inputs)
                    ours = handle.kept_indices[0].tolist()
                cases.append({"features": feats.tolist(), "thw": thw, "q": q, "ours": ours})
    script = """
import json, sys, torch
from vllm.multimodal.video_prune.evs import compute_retention_mask
cases = json.load(sys.stdin)
out = []
for c in cases:
    mask = compute_retention_mask(torch.tensor(c["features"]), c["thw"], spatial_merge_size=2, q=c["q"])
    out.append(mask.nonzero().flatten().tolist())
print(json.dumps(out))
"""
    proc = subprocess.run([str(VLLM_PYTHON), "-c", script], input=json.dumps(cases), capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(theirs) == len(cases) == 8 * len(FAMILIES)
    assert [c["ours"] for c in cases] == theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_a_per_frame_budget_keeps_each_frames_share(models, family):
    """video_budget="per_frame" (the default): every frame keeps round(keep * its tokens), chosen
    within it; an int keep counts tokens per frame."""
    model, processor = models[family]
    inputs = qwen_video_inputs(processor, [VIDEO + "?"], [frames(family, 6)])
    t, h, w = inputs["video_grid_thw"][0].tolist()
    per_frame = h * w // 4
    for keep, each in [(0.5, round(0.5 * per_frame)), (5, 5)]:
        with vlm_prune.pruned(model, "cls_attention", keep) as handle:
            logits(model, inputs)
            kept = handle.kept_indices[0]
        assert torch.bincount(kept // per_frame, minlength=t).tolist() == [each] * t
    with vlm_prune.pruned(model, "cls_attention", 5, video_budget="per_video") as handle:  # int: per video
        logits(model, inputs)
        assert handle.stats[0]["video_kept"] == 5


@pytest.mark.parametrize("family", FAMILIES)
def test_video_first_then_image_in_one_row(models, family):
    """Items in placeholder order whatever their kind: a video before an image in one row."""
    model, processor = models[family]
    inputs = qwen_video_inputs(processor, [VIDEO + "and" + IMAGE + "?"], [frames(family, 4, seed=5)],
                               images=[tiny.random_image(*FRAME[family], seed=8)])
    expected = logits(model, inputs)
    with vlm_prune.pruned(model, "pool", 1.0, positions="original"):
        assert torch.equal(logits(model, inputs), expected)
    with vlm_prune.pruned(model, "random", 0.5) as handle:
        logits(model, inputs)
        video_tokens = handle.stats[0]["video_tokens"]
        sizes = [len(k) for k in handle.kept_indices]
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert video_tokens == n_video
    assert sizes == [round(0.5 * n_video), round(0.5 * n_image)]  # the video's first


def test_video_budget_is_validated():
    with pytest.raises(ValueError, match=r"video_budget='per_shot' is not allowed; choose one of \['per_frame'"):
        PruneConfig.from_kwargs("cls_attention", 0.5, video_budget="per_shot")
    with pytest.raises(ValueError, match="coarser grid of each frame: use video_budget='per_frame'"):
        PruneConfig.from_kwargs("pool", 0.5, video_budget="per_video")
    with pytest.raises(ValueError, match="needs video_budget='per_video'"):
        PruneConfig.from_kwargs("evs", 0.5, video_budget="per_frame")
    with pytest.raises(ValueError, match="prunes inside the LLM"):
        PruneConfig.from_kwargs("fastv", 0.5, video_budget="per_video")
    assert PruneConfig.from_kwargs("evs", 0.5).video_policy == "per_video"
    assert PruneConfig.from_kwargs("divprune", 0.5).video_policy == "per_frame"


@pytest.mark.parametrize("entry, policy", [({"method": "evs", "keep": 0.25}, "per_video"),
                                           ({"method": "cls_attention", "keep": 0.25}, "per_frame"),
                                           ({"method": "cls_attention", "keep": 0.25, "video_budget": "per_video"},
                                            "per_video")])
def test_the_vllm_plugin_takes_video_budgets_and_refuses_what_it_cannot_serve(entry, policy):
    """The plugin prunes Qwen videos with fixed budgets (`evs` and video_budget included, the
    placeholder counts known before the encoder); what it cannot serve is a start-up error (the
    plugin's config check imports no vLLM): a video budget on a model without videos, a
    per-video pool whose count depends on the video. vLLM's own --video-pruning-rate beside the
    plugin is refused when the model is built (tests/test_vllm_video.py)."""
    from types import SimpleNamespace

    from vlm_prune.vllm_plugin.config import plugin_config

    config = plugin_config(SimpleNamespace(vlm_prune=entry), "qwen2_vl")
    assert config.video_policy == policy
    with pytest.raises(ValueError, match="applies to Qwen-VL videos only"):
        plugin_config(SimpleNamespace(vlm_prune={**entry, "video_budget": policy}), "llava")
    with pytest.raises(ValueError, match="needs video_budget='per_video'"):  # the same validation as patch()
        plugin_config(SimpleNamespace(vlm_prune={"method": "evs", "keep": 0.25, "video_budget": "per_frame"}),
                      "qwen2_vl")

    class Adaptive(EVS):  # a per-video count known only once the video is seen
        def output_count(self, k, grid, options):
            return None if len(grid) == 3 else super().output_count(k, grid, options)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("vlm_prune.vllm_plugin.config.get_method", lambda name: Adaptive)
        with pytest.raises(ValueError, match="depends on the video; vLLM needs a fixed budget"):
            plugin_config(SimpleNamespace(vlm_prune={"method": "evs", "keep": 0.25}), "qwen2_vl")


def test_evs_count_is_vllms():
    """floor(N * keep), at least one frame; an image (no earlier frame) stays whole."""
    method = EVS()
    config = PruneConfig.from_kwargs("evs", 1 - 0.7)
    n = 4 * 24
    assert config.budget_for(n) == int(n * (1 - 0.7)) == 28  # round() would give 29
    assert method.output_count(config.budget_for(n), (4, 4, 6), {}) == 28
    assert method.output_count(3, (4, 4, 6), {}) == 24  # the first frame
    assert method.output_count(3, (4, 6), {}) == 24  # an image


def test_video_inputs_pair_frames_into_temporal_patches(models):
    """qwen_video_inputs: temporal patch j of the video holds frames 2j and 2j+1, each as the
    image processor makes it (a still image fills both temporal slots with itself)."""
    _, processor = models["qwen2_vl"]
    clip = frames("qwen2_vl", 3, seed=1)  # odd: the last frame repeats
    video = qwen_video_inputs(processor, [VIDEO], [clip])
    t, h, w = video["video_grid_thw"][0].tolist()
    assert t == 2
    patches = video["pixel_values_videos"].view(t, h * w, 3, 2, -1)
    for j, pair in enumerate([(0, 1), (2, 2)]):
        for slot, f in enumerate(pair):
            still = processor.image_processor(images=[clip[f]], return_tensors="pt")["pixel_values"]
            assert torch.equal(patches[j, :, :, slot], still.view(h * w, 3, 2, -1)[:, :, 0])
    with pytest.raises(ValueError, match="1 <|video_pad|> slots for 2 videos"):
        qwen_video_inputs(processor, [VIDEO], [clip, clip])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("method, options", [("fastv", {"layer": 1}), ("transition", {})])
def test_in_llm_methods_prune_the_images_and_pass_videos_through(models, family, method, options):
    """In-LLM methods drop image tokens only: a prompt with a video and an image keeps every
    video token (the stats count the image's), and cache equals no cache; keep=1.0 is identical."""
    model, processor = models[family]
    inputs = mixed_inputs(family, processor, rows=(1,))
    expected = logits(model, inputs)
    with vlm_prune.pruned(model, method, 1.0, **options):
        assert torch.equal(logits(model, inputs), expected)
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with vlm_prune.pruned(model, method, 0.25, **options) as handle:
        with_cache = greedy(model, inputs)
        assert handle.stats[0]["visual_tokens"] == n_image and handle.stats[0]["kept"] < n_image
        assert torch.equal(with_cache, greedy(model, inputs, use_cache=False))
