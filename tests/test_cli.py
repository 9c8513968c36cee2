"""The command line, the bench and the FLOPs model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from vlm_prune import cli
from vlm_prune.flops import decoder_layer_flops, prefill_flops


def test_parse_keep_and_options():
    assert cli.parse_keep("64") == 64 and isinstance(cli.parse_keep("64"), int)
    assert cli.parse_keep("0.25") == 0.25 and cli.parse_keep("1.0") == 1.0
    assert cli.parse_options(["layers=[-3,-2]", "mode=avg", "seed=4"]) == {
        "layers": [-3, -2], "mode": "avg", "seed": 4}


def test_flops_by_hand():
    cfg = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                          intermediate_size=16, vocab_size=10, num_hidden_layers=2)
    n = 5
    by_hand = 2 * n * (8 * 8 + 8 * 4 + 8 * 4 + 8 * 8) + 2 * 2 * n * n * 8 + 2 * n * 3 * 8 * 16
    assert decoder_layer_flops(cfg, n) == by_hand
    flops = prefill_flops(cfg, [5, 3])
    assert flops.total == by_hand + decoder_layer_flops(cfg, 3) + 2 * 8 * 10
    with pytest.raises(ValueError, match="3 sequence lengths for a model of 2 layers"):
        prefill_flops(cfg, [1, 2, 3])


def test_bench_runs_and_reports_consistent_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--shape", "tiny", "--repeats", "2", "--threads", "1", "--json", str(out),
                     "--out", str(tmp_path / "results")]) == 0
    data = json.loads(out.read_text())
    assert data["visual_tokens"] == 576 and data["kept_tokens"] == 64
    assert data["llm_tokens_unpruned"] - data["llm_tokens_pruned"] == 576 - 64
    assert data["theoretical_llm_ratio"] > 1 and data["llm_ms_pruned"] > 0
    # the harness's samples: a warm-up round, then 2 interleaved rounds; the medians are its medians
    timings = data["timings"]
    assert timings["settings"]["rounds"] == 2 and timings["settings"]["warmup_rounds"] == 1
    assert timings["variants"]["pruned"]["select"]["n"] == 2
    assert timings["variants"]["unpruned"]["llm"]["median_ms"] == pytest.approx(data["llm_ms_unpruned"])
    printed = capsys.readouterr().out
    assert "theoretical LLM FLOPs ratio" in printed and "| pruned | select | 2 |" in printed
    # the run's numbers and report also land in --out
    saved, = (tmp_path / "results").glob("bench-transformers-tiny-cls_attention-64-*.json")
    assert json.loads(saved.read_text()) == data
    assert "theoretical LLM FLOPs ratio" in saved.with_name(saved.name[:-5] + ".txt").read_text()


def test_bad_cli_input_is_a_clear_error(capsys):
    assert cli.main(["bench", "--shape", "tiny", "--keep", "0", "--repeats", "1"]) == 2
    assert "keep=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--keep", "lots"])
    assert cli.main(["bench", "--shape", "tiny", "--repeats", "0"]) == 2  # not silently the default
    assert "repeats=0" in capsys.readouterr().err


def test_demo_runs_on_the_fixture(tmp_path, capsys):
    from vlm_prune import demo

    rows = demo.run(threads=1, n=60, methods=["cls_attention", "random"], budgets=[16], out=tmp_path)
    assert [(r["method"], r["keep"]) for r in rows] == [("unpruned", 144), ("cls_attention", 16), ("random", 16)]
    assert rows[0]["retention"] == 1.0 and all(r["kept"] == r["keep"] for r in rows)
    assert all(0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1 for r in rows)
    assert {"demo.md", "demo.json", "accuracy_vs_tokens.png"} <= {p.name for p in tmp_path.iterdir()}
    assert "| cls_attention | 16 |" in capsys.readouterr().out


def test_demo_position_policy_reaches_the_vision_stage_methods_only(tmp_path, capsys):
    """--positions original changes what cls_attention answers (the fixture reads cells from
    position ids) and is not passed to the in-LLM fastv, which keeps positions anyway."""
    from vlm_prune import demo

    kw = dict(threads=1, n=60, methods=["cls_attention", "fastv"], budgets=[16])
    default = demo.run(out=tmp_path / "a", **kw)
    original = demo.run(out=tmp_path / "b", positions="original", **kw)
    assert [r["positions"] for r in original] == ["default", "original", "default"]
    assert original[1]["per_qtype"] != default[1]["per_qtype"]
    assert original[2]["accuracy"] == default[2]["accuracy"]
    assert "vision-stage positions=original" in (tmp_path / "b" / "demo.md").read_text()
