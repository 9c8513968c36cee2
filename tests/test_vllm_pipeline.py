"""The vLLM plugin with a pipeline of vision-stage methods (`{"method": "cls_attention+divprune",
"keep": [32, 12]}` or `{"method": "cls_attention:0.5+divprune:0.5"}`).

The engine test runs real vLLM (the CPU build in .venv-vllm, as tests/test_vllm.py: a subprocess,
tests/vllm/run_llm.py) on the shipped fixture (a LLaVA-1.5, `vlm_prune.fixture`, 144 visual
tokens) and a tiny Qwen2-VL, one engine each, in one process; the reference is the same pipeline
on the transformers path (`vlm_prune.patch`) on the same folders here.
The start-up checks (an in-LLM stage refused, the forms of the block, a later stage's budget
policy) are the plugin's own config validation, called here on real HF configs without an
engine: vLLM's model classes call the same function when they are built.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

import vlm_prune
from vlm_prune import fixture, tiny
from vlm_prune.config import PruneConfig
from vlm_prune.evals import synthetic_vqa as sv
from vlm_prune.pipeline_config import PipelineConfig
from vlm_prune.vllm_plugin.checkpoint import save_for_vllm
from vlm_prune.vllm_plugin.config import ENV_VAR, plugin_config, plugin_plan

from . import test_vllm_qwen
from .test_vllm import RUNNER, VLLM_PYTHON, same_tokens

# the fixture: 144 -> 48 -> 16 tokens per image; VisionZip's merged tokens, then the tower's [CLS]
# attention at the slot each stands for (divprune on the fixture's features has near-ties, ~7e-5 in
# cosine distance, within vLLM's and transformers' float differences; it runs on Qwen below)
LLAVA = {"method": "visionzip+cls_attention", "keep": [48, 16]}
QWEN = {"method": "cls_attention:0.5+divprune:0.5"}  # the string form: each stage's keep in it
# the fixture's own prompts (its benchmark's questions; its WordLevel vocabulary knows no other words)
FIXTURE_REQUESTS = [{"prompt": item.prompt, "image": [168 + 24 * i, 168, 20 + i]}
                    for i, item in enumerate(sv.make_split("test", 4))]
FIXTURE_TOKENS = 3


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    # text head size 32: vLLM's CPU attention supports 32, 64, 80, 96, 112, 128, ...
    model, processor = tiny.qwen2_vl(version="2", text_hidden=128, text_heads=4)
    test_vllm_qwen.sharpen_text_attention(model)  # the output depends on the M-RoPE positions
    qwen = save_for_vllm(model, processor, tmp_path_factory.mktemp("tiny_qwen2_vl_pipeline_vllm"))
    # the fixture is shipped in the layout both transformers and vLLM load
    return {"llava": fixture.DEFAULT_PATH, "qwen2_vl": qwen}


@pytest.fixture(scope="module")
def vllm_results(model_dirs):
    """family -> the vLLM results of its pipeline (one subprocess, one engine per family)."""
    runs = [{"model": str(model_dirs["llava"]), "requests": FIXTURE_REQUESTS, "overrides": {"vlm_prune": LLAVA},
             "max_tokens": FIXTURE_TOKENS, "logprobs": True, "llm_kwargs": {"max_model_len": 512}},
            {"model": str(model_dirs["qwen2_vl"]), "requests": test_vllm_qwen.REQUESTS,
             "overrides": {"vlm_prune": QWEN}, "max_tokens": test_vllm_qwen.MAX_TOKENS}]
    spec = {"model": str(model_dirs["llava"]), "requests": FIXTURE_REQUESTS, "runs": runs}
    proc = subprocess.run([str(VLLM_PYTHON), str(RUNNER), json.dumps(spec)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    for line in proc.stdout.splitlines():
        if line.startswith("TIMINGS "):
            print(f"vLLM engine starts (s): {line[len('TIMINGS '):]}")
        if line.startswith("RESULT "):
            return dict(zip(["llava", "qwen2_vl"], json.loads(line[len("RESULT "):])))
    raise AssertionError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def fixture_generate(config=None) -> list[dict]:
    """The transformers path on the fixture: per request its greedy tokens, their logprobs and
    the prompt's length (patched with the pipeline `config` when given)."""
    model, processor = fixture.load()
    handle = vlm_prune.patch(model, config["method"], tuple(config["keep"])) if config else None
    results = []
    for request in FIXTURE_REQUESTS:
        inputs = processor(images=[tiny.random_image(*request["image"])], text=[request["prompt"]], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=FIXTURE_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        logprobs = [torch.log_softmax(score[0].float(), -1)[t].item() for score, t in zip(out.scores, tokens)]
        results.append({"tokens": tokens, "logprobs": logprobs, "prompt_tokens": int(inputs["input_ids"].shape[1])})
        if handle is not None:
            assert handle.stats[0]["kept_per_stage"] == tuple(LLAVA["keep"])
    return results


@pytest.mark.slow
def test_fixture_pipeline_equals_transformers_token_for_token(vllm_results):
    got = vllm_results["llava"]
    expected = fixture_generate(LLAVA)
    unpruned = fixture_generate()
    for g, e, u in zip(got, expected, unpruned):
        assert same_tokens(g["tokens"], e["tokens"]), (g, e)
        n = len(e["tokens"])
        assert g["logprobs"][:n] == pytest.approx(e["logprobs"], abs=1e-3), (g, e)
        # the last stage's count is what vLLM reserved
        assert g["prompt_tokens"] == u["prompt_tokens"] - (144 - LLAVA["keep"][-1])
    # pruning mattered: the pruned model's logprobs are not the unpruned one's
    assert any(e["logprobs"] != pytest.approx(u["logprobs"], abs=1e-3) for e, u in zip(expected, unpruned))


@pytest.mark.slow
def test_qwen_pipeline_equals_transformers_token_for_token(model_dirs, vllm_results):
    got = vllm_results["qwen2_vl"]
    expected = test_vllm_qwen.hf_generate(model_dirs["qwen2_vl"], QWEN["method"])
    unpruned = test_vllm_qwen.hf_generate(model_dirs["qwen2_vl"])
    for g, e, u in zip(got, expected, unpruned):
        assert same_tokens(g["tokens"], e["tokens"]), (g, e)
        assert e["kept"] < u["image_tokens"]
        assert g["prompt_tokens"] == u["prompt_tokens"] - u["image_tokens"] + e["kept"], (g, e, u)
    assert any(e["tokens"] != u["tokens"] for e, u in zip(expected, unpruned))


# -- start-up checks, on real HF configs (no engine) ----------------------------------------------


@pytest.fixture(scope="module")
def hf_configs():
    return {"llava": tiny.llava_config(), "llava_next": tiny.llava_next()[0].config,
            "qwen2_vl": tiny.qwen2_vl()[0].config}


def with_block(config, block):
    config.vlm_prune = block
    return config


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("block", [{"method": "cls_attention+fastv", "keep": [32, 8], "layer": 1},
                                   {"method": "divprune:0.5+cls_attention:0.5+transition:0.5"}])
def test_an_in_llm_stage_is_refused_at_start_up(hf_configs, family, block):
    config = with_block(hf_configs[family], block)
    stage = block["method"].split("+")[-1].split(":")[0]
    with pytest.raises(ValueError, match=f"method '{stage}' \\(a stage of .*\\) prunes inside the LLM; on vLLM only "
                                         "vision-stage methods run"):
        plugin_config(config, family)


def test_an_in_llm_stage_from_the_environment_is_refused(hf_configs, monkeypatch):
    """$VLM_PRUNE (used when the config has no block) is checked the same way."""
    config = hf_configs["llava"]
    config.vlm_prune = None
    monkeypatch.setenv(ENV_VAR, json.dumps({"method": "cls_attention:32+fastv:8"}))
    with pytest.raises(ValueError, match="'fastv' \\(a stage of 'cls_attention\\+fastv'\\) prunes inside the LLM"):
        plugin_config(config, "llava")
    monkeypatch.setenv(ENV_VAR, json.dumps({"method": "cls_attention:32+divprune:8"}))
    assert plugin_config(config, "llava").keep == (32, 8)


def test_the_two_forms_of_the_block_and_what_they_resolve_to(hf_configs):
    config = hf_configs["llava"]
    listed = plugin_config(with_block(config, {"method": "visionzip+divprune", "keep": [32, 12]}), "llava")
    written = plugin_config(with_block(config, {"method": "visionzip:32+divprune:12"}), "llava")
    assert isinstance(listed, PipelineConfig) and listed == written
    first, second = listed.stages
    # resolved as vlm_prune.patch resolves them: one position policy, each stage's own budget
    # policy, and a stage another follows keeps each token at the slot it stands for
    assert (first.positions, second.positions) == ("renumber", "renumber")
    assert (first.budget, second.budget) == ("per_crop", "pooled")
    assert first.options["layout"] == "raster"
    plan = plugin_plan(config, "llava")
    assert [stage.method.name for stage in plan.stages] == ["visionzip", "divprune"]
    assert plan.needs == {"cls_attention", "keys", "cls_feature"}
    one = plugin_config(with_block(config, {"method": "visionzip", "keep": 16}), "llava")
    assert isinstance(one, PruneConfig) and one.options["layout"] == "release"  # alone: the release's layout
    qwen = plugin_config(with_block(hf_configs["qwen2_vl"], {"method": "dct:0.5+divprune:0.5"}), "qwen2_vl")
    assert {s.positions for s in qwen.stages} == {"original"}  # the policy both stages keep


@pytest.mark.parametrize("family, block, message", [
    ("llava", {"method": "cls_attention+divprune"}, r"no keep for stage\(s\) \['cls_attention', 'divprune'\]"),
    ("llava", {"method": "cls_attention"}, "must be an object with at least 'method' and 'keep'"),
    ("llava", {"method": "cls_attention", "keep": 16, "stage_options": [{}]}, "stage_options applies to pipelines"),
    ("llava", {"method": "cls_attention+pool", "keep": [32, 8]}, "'pool' can only be the first vision stage"),
    ("llava", {"method": "cls_attention+cdpruner", "keep": [32, 8]}, "'cdpruner' .*needs the question"),
    ("llava_next", {"method": "divprune+cls_attention", "keep": [0.5, 0.5],
                    "stage_options": [{"budget": "per_image"}, {"budget": "per_crop"}]},
     "'cls_attention' \\(budget='per_crop'\\) follows 'divprune' \\(budget='per_image'\\)"),
    ("qwen2_vl", {"method": "evs+divprune", "keep": [0.5, 0.5]},
     "'divprune' \\(video_budget='per_frame'\\) follows 'evs' \\(video_budget='per_video'\\)"),
    ("qwen2_vl", {"method": "dct+divprune", "keep": [0.5, 0.5], "positions": "renumber"},
     "positions='renumber' is not available for this model on vLLM with 'dct\\+divprune'"),
])
def test_what_vllm_cannot_serve_is_refused_at_start_up(hf_configs, family, block, message):
    with pytest.raises(ValueError, match=message):
        plugin_config(with_block(hf_configs[family], block), family)
