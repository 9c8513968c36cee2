"""The runner without a model (a scripted backend): resume after an interruption, a cut-off
last line, skipped images, the setup guard, the CLI's exit codes and the report."""

from __future__ import annotations

import json

import pytest

from vlm_prune.evals import backends as backends_mod
from vlm_prune.evals.backend import Backend, Prediction
from vlm_prune.evals.cli import main
from vlm_prune.evals.configs import make_config
from vlm_prune.evals.data import DataError
from vlm_prune.evals.report import write_report
from vlm_prune.evals.runner import run_benchmark
from vlm_prune.evals.tasks import get_task, load_items

from .test_evals_samples import write_all, write_pope


class Scripted(Backend):
    """Answers "yes" (or `answer`); raises `fail` on generate call number `fail_at` (1-based)."""

    name = "scripted"

    def __init__(self, answer="yes", fail_at=None, fail=KeyboardInterrupt):
        self.answer, self.fail_at, self.fail = answer, fail_at, fail
        self.calls, self.asked, self.config = 0, [], None

    def configure(self, method, keep, options):
        self.config = (method, keep)

    def generate(self, batch):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.fail()
        self.asked += [r.id for r in batch]
        kept = 64 if self.config[0] == "none" else 16
        return [Prediction(r.id, self.answer, 64, kept, 0.01, 0.02, 2, 0.01, 1 << 20, 1e9 * kept / 64, len(batch)) for r in batch]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def pope(tmp_path):
    write_pope(tmp_path / "data" / "pope")
    return get_task("pope"), load_items(get_task("pope"), tmp_path / "data")[0]


def test_resume_after_interruption(tmp_path, pope):
    task, items = pope
    config, out = make_config("pool", 16), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(Scripted(fail_at=3), task, config, items, out, batch_size=2, progress=False)
    path = out / "pool-16" / "pope" / "predictions.jsonl"
    first = _lines(path)
    assert [r["id"] for r in first] == [it.id for it in items[:4]]  # two full batches, flushed
    again = Scripted()
    summary = run_benchmark(again, task, config, items, out, batch_size=2, progress=False)
    assert again.asked == [it.id for it in items[4:]]  # only what was missing
    final = _lines(path)
    assert [r["id"] for r in final] == [it.id for it in items]  # no duplicate, nothing lost
    assert final[:4] == first
    assert summary["n_answered"] == 6 and summary["metrics"]["yes_ratio"] == 100.0
    assert summary["efficiency"]["kept"] == 16


def test_cut_off_last_line_is_redone(tmp_path, pope):
    task, items = pope
    config, out = make_config("none", 1.0), tmp_path / "out"
    run_benchmark(Scripted(fail_at=2), task, config, items[:2], out, batch_size=2, progress=False)
    path = out / "none" / "pope" / "predictions.jsonl"
    with open(path, "a") as f:
        f.write('{"id": "popular/1", "predic')  # killed in the middle of a write
    again = Scripted()
    run_benchmark(again, task, config, items, out, batch_size=2, progress=False)
    assert again.asked == [it.id for it in items[2:]]
    assert sorted(r["id"] for r in _lines(path)) == sorted(it.id for it in items)


def test_skipped_image_is_counted_and_named(tmp_path, pope):
    task, items = pope
    (tmp_path / "data" / "pope" / "val2014" / "COCO_val2014_000000000001.jpg").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"coco_pope_random\.json:2: image does not open"):
        run_benchmark(Scripted(), task, make_config("none", 1.0), items, tmp_path / "a", progress=False)
    s = run_benchmark(Scripted(), task, make_config("none", 1.0), items, tmp_path / "b", on_error="skip", progress=False)
    assert s["skipped"] == 3 and s["n_answered"] == 3  # image 1 is used by one question per split
    skipped = _lines(tmp_path / "b" / "none" / "pope" / "skipped.jsonl")
    assert [x["id"] for x in skipped] == ["random/2", "popular/2", "adversarial/2"]


def test_setup_change_is_refused(tmp_path, pope):
    task, items = pope
    run_benchmark(Scripted(), task, make_config("none", 1.0), items, tmp_path, progress=False)
    with pytest.raises(ValueError, match="different setup.*prompt_suffix"):
        run_benchmark(Scripted(), task, make_config("none", 1.0), items, tmp_path, suffix="Say yes.", progress=False)


def test_cli_interrupt_then_resume(tmp_path, monkeypatch, capsys):
    data = write_all(tmp_path / "data")
    backends = iter([Scripted(answer="B", fail_at=2), Scripted(answer="B")])
    monkeypatch.setattr(backends_mod, "make_backend", lambda *a, **k: next(backends))
    argv = ["--model", "unused", "--compare", "none", "cls_attention:16", "--bench", "sqa,mmbench",
            "--data", str(data), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err
    assert main(argv) == 0
    out = tmp_path / "out"
    for config in ("none", "cls_attention-16"):
        for bench, n in (("scienceqa_img", 2), ("mmbench", 3)):
            ids = [r["id"] for r in _lines(out / config / bench / "predictions.jsonl")]
            assert len(ids) == len(set(ids)) == n
    results = json.loads((out / "results.json").read_text())["results"]
    sqa = {s["config"]: s for s in results if s["bench"] == "scienceqa_img"}
    assert sqa["none"]["score"] == 50.0  # "B" is right for pid 5 only
    assert sqa["cls_attention-16"]["retention"] == 100.0 and sqa["cls_attention-16"]["flops_ratio"] == 4.0
    md = (out / "results.md").read_text()
    assert "| scienceqa_img | cls_attention-16 | 2/2 | accuracy 50.00 | 100.0 | 64 -> 16 |" in md


def test_cli_errors(tmp_path, capsys):
    write_all(tmp_path / "data")
    base = ["--model", str(tmp_path), "--bench", "pope", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")]
    assert main(base + ["--method", "nope"]) == 1
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(base + ["--method", "none", "--backend", "vllm"]) == 1  # no vLLM in the main venv
    assert "--backend vllm needs vLLM in this environment" in capsys.readouterr().err
    assert main(base[:2] + ["--bench", "coco", "--data", "x", "--method", "none"]) == 1
    assert "unknown benchmark 'coco'" in capsys.readouterr().err
    (tmp_path / "data" / "pope" / "coco_pope_random.json").write_text("{broken\n")
    assert main(base + ["--method", "none"]) == 2
    assert "coco_pope_random.json:1: malformed JSON line" in capsys.readouterr().err


def test_report_writes_json_markdown_and_png(tmp_path, pope, capsys):
    task, items = pope
    run_benchmark(Scripted(), task, make_config("random", 0.5), items, tmp_path, progress=False)
    report = write_report(tmp_path)
    assert report["json"].exists() and report["markdown"].exists()
    s = report["summaries"][0]
    assert s["retention"] is None  # no baseline in this folder
    assert report["png"].exists() and report["png"].stat().st_size > 1000  # the no-matplotlib case: test_plot.py
