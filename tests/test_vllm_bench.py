"""`vlm-prune bench --backend vllm` (vlm_prune/vllm_plugin/bench.py) with real vLLM on CPU: two
engine starts on the "tiny" shape."""

from __future__ import annotations

import json
import subprocess

import pytest

from .test_vllm import ROOT, VLLM_PYTHON

pytestmark = pytest.mark.slow


def bench(*args: str) -> subprocess.CompletedProcess:
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    return subprocess.run([str(VLLM_PYTHON), "-m", "vlm_prune.cli", "bench", "--backend", "vllm", *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_vllm_bench_runs_both_engines_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    proc = bench("--shape", "tiny", "--keep", "64", "--repeats", "1", "--batch", "2", "--max-tokens", "2",
                 "--text-tokens", "16", "--json", str(out), "--out", str(tmp_path / "results"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    # the engine with the plugin ran 576 - 64 fewer prompt tokens per request
    assert result["prompt_tokens_unpruned"] - result["prompt_tokens_pruned"] == 576 - 64
    assert result["prompt_tokens_pruned"] > 64
    for key in ("ttft_ms_unpruned", "ttft_ms_pruned", "batch_s_unpruned", "batch_s_pruned"):
        assert result[key] > 0
    assert result["ttft_speedup"] == pytest.approx(result["ttft_ms_unpruned"] / result["ttft_ms_pruned"])
    assert "time to first token (ms)" in proc.stdout and "prompt tokens (KV cache)" in proc.stdout
    # the harness: one warm-up round, then the engines in turns; its medians are the reported ones
    timings = result["timings"]
    assert list(timings["variants"]) == ["unpruned ttft", "unpruned batch", "pruned ttft", "pruned batch"]
    assert timings["settings"]["warmup_rounds"] == 1 and timings["variants"]["pruned ttft"]["time"]["n"] == 1
    assert timings["variants"]["pruned ttft"]["time"]["median_ms"] == pytest.approx(result["ttft_ms_pruned"])
    saved, = (tmp_path / "results").glob("bench-vllm-tiny-cls_attention-64-*.json")
    assert json.loads(saved.read_text()) == result


def test_vllm_bench_refuses_what_vllm_cannot_serve_before_building(tmp_path):
    proc = bench("--shape", "tiny", "--method", "transition", "--keep", "0.25", "--out", str(tmp_path))
    assert proc.returncode != 0
    assert "prunes inside the LLM" in proc.stderr
    assert "Initializing a V1 LLM engine" not in proc.stdout + proc.stderr
