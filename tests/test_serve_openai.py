"""Serving the shipped fixture with vLLM's OpenAI-compatible server, as docs/vllm.md says, answers
the official `openai` client (issue #28).

The fixture (vlm_prune/fixture_model) and the tiny Qwen models ship chat templates: applied to a
user message with an image and a question they give exactly the prompts the project's own
evaluation uses. The slow test starts the server with the command docs/vllm.md prints for the
fixture (only the port changed), sends chat completions with a base64 PNG through the `openai`
client of .venv-vllm, and compares each answer and the prompt token ids vLLM used with the
transformers path (`vlm_prune.fixture` + `vlm_prune.patch`) on the same image and question.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import vlm_prune
from vlm_prune import fixture, tiny
from vlm_prune.evals import synthetic_vqa as sv
from vlm_prune.evals.hf_loading import prompt_for

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
DOC = ROOT / "docs" / "vllm.md"
MARKER = "tests/test_serve_openai.py starts exactly this"
CPU_MODULE = "vllm.entrypoints.launchers.api_server.entry"


def _items() -> list[sv.VQAItem]:
    """One test-split question of each type."""
    items: dict[str, sv.VQAItem] = {}
    for item in sv.make_split("test", 60):
        items.setdefault(item.qtype, item)
    assert len(items) == 6
    return list(items.values())


def _user(question: str, image=None, text_first: bool = False) -> list[dict]:
    image_part = {"type": "image"} if image is None else {"type": "image", "image": image}
    parts = [image_part, {"type": "text", "text": question}]
    return [{"role": "user", "content": parts[::-1] if text_first else parts}]


# -- the chat templates (no vLLM) ----------------------------------------------------------------


def test_fixture_chat_template_gives_the_evaluation_prompt_token_for_token():
    _, processor = fixture.load()
    assert (fixture.DEFAULT_PATH / "chat_template.jinja").is_file()
    assert processor.chat_template == processor.tokenizer.chat_template  # both read the one file
    for item in _items():
        for text_first in (False, True):  # the image goes first whatever the order of the parts
            rendered = processor.apply_chat_template(_user(item.question, text_first=text_first),
                                                     add_generation_prompt=True, tokenize=False)
            assert rendered == item.prompt == sv.prompt(item.question)
        chat = processor.apply_chat_template(_user(item.question, item.image), add_generation_prompt=True,
                                             tokenize=True, return_dict=True, return_tensors="pt")
        reference = processor(images=[item.image], text=[item.prompt], return_tensors="pt")
        assert torch.equal(chat["input_ids"], reference["input_ids"])
        assert torch.equal(chat["pixel_values"], reference["pixel_values"])
        assert prompt_for(processor, "llava", item.question) == item.prompt  # the eval harness's prompt
    # a system message is dropped, an earlier turn is kept as the fixture's format writes it
    turns = [{"role": "system", "content": "be brief"}, *_user("what color is the circle ?"),
             {"role": "assistant", "content": "red"}, {"role": "user", "content": "how many shapes are there ?"}]
    assert processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False) == (
        "<s> <image> what color is the circle ? answer : red </s> <s> how many shapes are there ? answer :")
    assert processor.apply_chat_template(_user("is there a red circle ?"), tokenize=False) == "<s> <image> is there a red circle ?"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_tiny_qwen_chat_template_gives_the_harness_prompt(family, tmp_path):
    from vlm_prune.evals.hf_loading import load_processor
    from vlm_prune.vllm_plugin.checkpoint import save_for_vllm

    build = {"qwen2_vl": lambda: tiny.qwen2_vl(vision_depth=1, text_layers=1),
             "qwen2_5_vl": lambda: tiny.qwen2_vl(version="2.5", vision_depth=1, text_layers=1),
             "qwen3_vl": lambda: tiny.qwen3_vl(),
             "qwen3_5": lambda: tiny.qwen3_5()}[family]
    model, processor = build()
    question = "What is it?"
    expected = f"<|im_start|>user\n{tiny.qwen_prompt(question)}<|im_end|>\n<|im_start|>assistant\n"
    assert processor.apply_chat_template(_user(question), add_generation_prompt=True, tokenize=False) == expected
    assert processor.tokenizer.chat_template == processor.chat_template == tiny.QWEN_CHAT_TEMPLATE
    save_for_vllm(model, processor, tmp_path)  # what the vLLM tests save: the template travels with it
    assert (tmp_path / "chat_template.jinja").read_text() == tiny.QWEN_CHAT_TEMPLATE
    reloaded = load_processor(tmp_path, family)
    assert prompt_for(reloaded, family, question) == expected
    image = tiny.random_image(100, 60)
    ids = [p(images=[image], text=[expected], return_tensors="pt")["input_ids"] for p in (processor, reloaded)]
    assert torch.equal(*ids)


def test_readme_and_docs_give_the_working_serve_commands():
    readme, doc = (ROOT / "README.md").read_text(), DOC.read_text()
    for text in (readme, doc):
        assert "vllm.entrypoints.openai.api_server --model" not in text  # deprecated in vLLM 0.32
        assert f"python -m {CPU_MODULE} --model" in text and "\nvllm serve " in text
        assert "--kv-cache-memory-bytes" in text and "--dtype float32" in text
    _documented_fixture_command()


# -- the server (real vLLM, CPU build) ----------------------------------------------------------------


def _documented_fixture_command() -> list[str]:
    """The fixture's serve command of docs/vllm.md (the lines after the marker comment)."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S) if MARKER in b)
    command = block[block.index(MARKER):].split("\n", 1)[1].split("\n#", 1)[0]
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:3] == [".venv-vllm/bin/python", "-m", CPU_MODULE] and "--port" in argv, argv
    return argv


CLIENT = r"""
import base64, json, sys
from openai import OpenAI

spec = json.loads(sys.argv[1])
client = OpenAI(base_url=f"http://127.0.0.1:{spec['port']}/v1", api_key="none")
model = client.models.list().data[0].id
out = []
for request in spec["requests"]:
    url = "data:image/png;base64," + base64.b64encode(open(request["image"], "rb").read()).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": request["question"]}]
    raw = client.chat.completions.with_raw_response.create(
        model=model, max_tokens=1, temperature=0, extra_body={"return_token_ids": True},
        messages=[{"role": "user", "content": parts[::-1] if request["text_first"] else parts}])
    reply = raw.parse()
    out.append({"status": raw.status_code, "model": model, "answer": reply.choices[0].message.content,
                "prompt_token_ids": reply.prompt_token_ids, "prompt_tokens": reply.usage.prompt_tokens})
print("RESULT " + json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(server: subprocess.Popen) -> None:
    """Ends the server's process group (its API server, engine core and worker): TERM, then KILL."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


@pytest.mark.slow
def test_documented_server_answers_the_openai_client_as_transformers_does(tmp_path):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    argv = _documented_fixture_command()
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])["vlm_prune"]
    assert argv[argv.index("--model") + 1] == "vlm_prune/fixture_model"
    port = _free_port()
    argv[argv.index("--port") + 1] = str(port)
    argv[0] = str(ROOT / argv[0])

    # the reference: the transformers path on the same images and questions, greedy, one token
    items = _items()
    model, processor = fixture.load()
    vlm_prune.patch(model, overrides["method"], overrides["keep"])
    requests, expected = [], []
    for i, item in enumerate(items):
        image = tmp_path / f"{i}.png"
        item.image.save(image)  # PNG: lossless, the server decodes the same pixels
        inputs = processor(images=[item.image], text=[item.prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        ids = inputs["input_ids"][0].tolist()
        image_at = ids.index(model.config.image_token_id)
        pruned_ids = ids[:image_at] + ids[image_at:image_at + overrides["keep"]] + ids[image_at + 144:]
        requests.append({"image": str(image), "question": item.question, "text_first": i % 2 == 1})
        expected.append({"answer": processor.tokenizer.decode(out[0, -1:]), "prompt_token_ids": pruned_ids})
    assert len({e["answer"] for e in expected}) > 2  # the questions ask different things

    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.monotonic()
        while True:
            if server.poll() is not None:
                raise AssertionError("the server exited:\n" + (tmp_path / "server.log").read_text()[-6000:])
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
                break
            except OSError:
                if time.monotonic() - start > 400:
                    raise AssertionError("the server did not start:\n" + (tmp_path / "server.log").read_text()[-6000:])
                time.sleep(1)
        proc = subprocess.run([str(VLLM_PYTHON), "-c", CLIENT, json.dumps({"port": port, "requests": requests})],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        replies = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    finally:
        _stop(server)
        log.close()
    assert len(replies) == len(items)
    for item, reply, want in zip(items, replies, expected):
        assert reply["status"] == 200 and reply["model"] == "vlm_prune/fixture_model"
        assert reply["prompt_token_ids"] == want["prompt_token_ids"], item.question  # the template, then pruned
        assert reply["prompt_tokens"] == len(want["prompt_token_ids"])
        # vLLM's incremental detokenizer writes the word with the space that separates it from the prompt
        assert reply["answer"].strip() == want["answer"], (item.question, reply["answer"], want["answer"])
    server_log = (tmp_path / "server.log").read_text()
    assert "dtype=torch.float32" in server_log and "Explicitly set (1.0/" in server_log  # the CPU flags took
    assert "DeprecationWarning" not in server_log
