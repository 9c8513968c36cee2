"""The harness on the fixture model through the vLLM backend (real vLLM, CPU build, in
.venv-vllm) gives the same answers as through the transformers backend, baseline and pruned."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from vlm_prune import fixture
from vlm_prune.evals.cli import main

from .test_evals_samples import write_all
from .test_vllm import ROOT, VLLM_PYTHON

pytestmark = pytest.mark.slow


def _predictions(out, config, bench):
    lines = (out / config / bench / "predictions.jsonl").read_text().splitlines()
    return {r["id"]: r for r in map(json.loads, lines)}


def test_vllm_backend_matches_hf_backend(tmp_path):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    model_dir = fixture.DEFAULT_PATH  # shipped in the layout both transformers and vLLM load
    data = write_all(tmp_path / "data")
    args = ["--model", str(model_dir), "--compare", "none", "cls_attention:16", "--bench", "pope,vqav2",
            "--data", str(data), "--limit", "2", "--max-new-tokens", "3", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "hf"), "--device", "cpu"]) == 0
    proc = subprocess.run([str(VLLM_PYTHON), "-m", "vlm_prune.evals.cli", *args, "--backend", "vllm",
                           "--out", str(tmp_path / "vllm")], capture_output=True, text=True, timeout=900,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for config, kept in (("none", 144), ("cls_attention-16", 16)):
        for bench in ("pope", "vqav2"):
            hf, vllm = _predictions(tmp_path / "hf", config, bench), _predictions(tmp_path / "vllm", config, bench)
            assert hf.keys() == vllm.keys() and len(hf) >= 2
            for item, record in vllm.items():
                # a random model emits partial UTF-8 byte tokens: vLLM's incremental detokenizer
                # holds an unfinished character back, transformers prints U+FFFD for it
                assert record["prediction"].replace("\ufffd", "") == hf[item]["prediction"].replace("\ufffd", ""), (
                    config, bench, item)
                assert record["new_tokens"] == hf[item]["new_tokens"]
                assert record["visual_tokens"] == 144 and record["kept"] == kept
    results = json.loads((tmp_path / "vllm" / "results.json").read_text())["results"]
    assert {r["config"] for r in results} == {"none", "cls_attention-16"}
