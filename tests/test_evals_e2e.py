"""End to end through the HF backend: tiny random-weight checkpoints saved with save_pretrained
and reloaded offline, every benchmark's sample folder, baseline vs pruned."""

from __future__ import annotations

import json

import pytest

from vlm_prune import tiny
from vlm_prune.evals.backend import Request
from vlm_prune.evals.cli import main
from vlm_prune.evals.hf_backend import HFBackend
from vlm_prune.evals.hf_loading import load_local, prompt_for

from .test_evals_samples import EXPECTED, write_all


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llava")
    model, processor = tiny.llava(seed=0)  # 64 visual tokens per image
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_benchmark_baseline_and_pruned(tmp_path, llava_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data, out = write_all(tmp_path / "data"), tmp_path / "out"
    argv = ["--model", str(llava_dir), "--compare", "none", "cls_attention:16", "--bench", ",".join(EXPECTED),
            "--data", str(data), "--out", str(out), "--limit", "2", "--batch-size", "2", "--no-progress",
            "--device", "cpu", "--max-new-tokens", "3"]
    assert main(argv) == 0
    # --limit 2: 2 questions, POPE 2 per split, MME 2 images x 2 questions
    expected = {**{b: 2 for b in EXPECTED}, "pope": 6, "mme": 4}
    for config, kept in (("none", 64), ("cls_attention-16", 16)):
        for bench, n in expected.items():
            folder = out / config / bench
            records = _lines(folder / "predictions.jsonl")
            assert len(records) == n and len({r["id"] for r in records}) == n
            assert all(r["visual_tokens"] == 64 and r["kept"] == kept for r in records)  # pruning happened
            assert all(r["prefill_s"] > 0 and r["ttft_s"] >= r["prefill_s"] and r["prefill_flops"] > 0 for r in records)
            assert all(1 <= r["new_tokens"] <= 3 and r["batch_size"] in (1, 2) for r in records)
            assert json.loads((folder / "setup.json").read_text())["model_type"] == "llava"
    results = json.loads((out / "results.json").read_text())["results"]
    assert len(results) == 2 * len(EXPECTED)
    for s in results:
        assert s["n_answered"] == s["n_items"] == expected[s["bench"]]
        bounds = {"perception": 2000}.get(s["primary"], 100)
        assert 0 <= s["score"] <= bounds
        if s["config"] != "none":
            assert s["flops_ratio"] > 1.3  # 64 -> 16 visual tokens of prompts of 80-160 tokens
            assert s["efficiency"]["kept"] == 16 and s["efficiency"]["visual_tokens"] == 64
    pope = next(s for s in results if s["bench"] == "pope" and s["config"] == "none")["metrics"]
    assert {"random/f1", "popular/accuracy", "adversarial/yes_ratio"} <= set(pope)
    md = (out / "results.md").read_text()
    assert md.count("| cls_attention-16 |") == len(EXPECTED)
    # a second run resumes: nothing is asked again, files unchanged
    before = (out / "none" / "pope" / "predictions.jsonl").read_text()
    assert main(argv) == 0
    assert (out / "none" / "pope" / "predictions.jsonl").read_text() == before


def test_qwen_checkpoint_loads_offline_and_prunes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = tiny.qwen2_vl(seed=0, max_pixels=64 * 28 * 28)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    _, loaded, family = load_local(tmp_path, device="cpu")
    assert family == "qwen2_vl" and loaded.tokenizer.padding_side == "left"
    assert "<|image_pad|>" in prompt_for(loaded, family, "What is it?")
    backend = HFBackend(str(tmp_path), device="cpu")
    backend.configure("pool", 0.25, {})
    reqs = [Request("a", tiny.random_image(112, 84, 0), "What is it?", 2),
            Request("b", tiny.random_image(84, 112, 1), "Is it red?", 2)]
    preds = backend.generate(reqs)
    assert [p.id for p in preds] == ["a", "b"]
    assert all(p.visual_tokens == 12 and p.kept == 3 for p in preds)  # 112x84 px -> 4x3 merged tokens
    backend.configure("none", 1.0, {})
    assert all(p.kept == p.visual_tokens == 12 for p in backend.generate(reqs))
    backend.close()
