"""`vlm-prune demo`: rows from method names, configuration strings and pipelines; the speed
columns (the FLOPs ratio of what each decoder layer saw, the measured ratio shown only where
its rounds agree); a small run on the fixture through the CLI and through `demo.run`."""

from __future__ import annotations

import json

import pytest
import torch

from vlm_prune import api, cli, demo
from vlm_prune.flops import prefill_flops

# -- rows ---------------------------------------------------------------------------------------


def test_expand_names_strings_and_pipelines():
    rows = demo.expand("cls_attention", [36, 16])
    assert [(r.label, r.budget, r.stages) for r in rows] == [
        ("cls_attention", 36, (("cls_attention", 36, {}),)), ("cls_attention", 16, (("cls_attention", 16, {}),))]
    (row,) = demo.expand("cls_attention:36", [72, 8])  # a keep in the string: one row, the budgets unused
    assert (row.label, row.budget, row.describe()) == ("cls_attention", 36, "cls_attention:36")
    (row,) = demo.expand("fastv", [16])  # the demo's option for the 3-layer LLM, not in the label
    assert (row.label, row.stages) == ("fastv", (("fastv", 16, {"layer": 1}),))
    (row,) = demo.expand("fastv::layer=2", [16])  # an option of the user's: in the label, over the demo's
    assert (row.label, row.stages) == ("fastv (layer=2)", (("fastv", 16, {"layer": 2}),))
    # a pipeline template: the in-LLM stage keeps the row's budget, the vision stage twice that (<= 108)
    rows = demo.expand("visionzip+transition", [72, 36, 16, 8])
    assert [r.describe() for r in rows] == ["visionzip:108+transition:72", "visionzip:72+transition:36",
                                           "visionzip:32+transition:16", "visionzip:16+transition:8"]
    assert {r.label for r in rows} == {"visionzip+transition"} and [r.budget for r in rows] == [72, 36, 16, 8]
    (row,) = demo.expand("cls_attention+fastv", [16])
    assert row.stages == (("cls_attention", 32, {}), ("fastv", 16, {"layer": 1}))
    (row,) = demo.expand("visionzip:72+fastv:16:layer=1", [8])  # a fixed pipeline: one row
    assert (row.label, row.budget, row.describe()) == ("visionzip:72+fastv", 16, "visionzip:72+fastv:16:layer=1")
    (row,) = demo.expand(("dct", {"rescale": True}), [16])  # a variant
    assert (row.label, row.stages) == ("dct (rescale=True)", (("dct", 16, {"rescale": True}),))


def test_default_rows():
    assert demo.BUDGETS == [72, 36, 16, 8]
    assert {"cdpruner", "fopru", "visionzip+transition", "cls_attention+fastv"} <= set(demo.METHODS)
    assert "globalcom2" not in demo.METHODS  # LLaVA-NeXT only; the fixture is LLaVA-1.5
    for spec in demo.METHODS:
        for row in demo.expand(spec, demo.BUDGETS):
            row.check()
            assert row.label == spec and row.stages[-1][1] == row.budget  # what the row keeps in the end


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown method 'nope'"),
    ("visionzip:72+fastv", "give every stage its keep"),
    ("fastv:16:bogus=1", "bogus"),
    ("fastv+visionzip", "a pipeline is"),  # the in-LLM stage last
])
def test_bad_rows_fail_before_anything_runs(spec, message):
    with pytest.raises((ValueError, TypeError), match=message):
        for row in demo.expand(spec, [16]):
            row.check()
    with pytest.raises(SystemExit):  # the CLI refuses it while parsing
        cli.build_parser().parse_args(["demo", "--method", spec])


def test_cli_budgets_and_methods_are_parsed():
    args = cli.build_parser().parse_args(["demo", "--config", "cls_attention:36", "--method", "visionzip+fastv",
                                          "--budgets", "36,8", "--timing-rounds", "0"])
    assert args.methods == ["cls_attention:36", "visionzip+fastv"] and args.budgets == [36, 8]
    assert args.timing_rounds == 0
    assert cli.build_parser().parse_args(["demo"]).methods is None  # the defaults
    for bad in ("0", "145", "a,b", ""):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["demo", "--budgets", bad])


# -- the speed columns ------------------------------------------------------------------------------


def test_speed_cell_shows_a_measured_ratio_only_where_its_rounds_agree():
    assert demo.speed_cell(2.314, 0.06) == "2.31x (IQR 6%)"
    assert demo.speed_cell(2.0, demo.STABLE_SPREAD) == "2.00x (IQR 10%)"
    assert demo.speed_cell(2.0, 0.11) == "—"
    assert demo.speed_cell(None, None) == demo.speed_cell(2.0, None) == demo.speed_cell(2.0, float("nan")) == "—"
    assert demo.speed_cell(2.0, 0.3, limit=0.5) == "2.00x (IQR 30%)"


def test_paired_ratios_are_per_round():
    # round 2 was slow for both (another job): the per-round ratios stay 2, the pooled medians would not
    assert demo.paired_ratios([1.0, 5.0, 1.0, 1.0, 1.0], [0.5, 2.5, 0.5, 0.5, 0.5]) == (2.0, 0.0)
    # ratios 2, 1, 4, 2, 2: one odd round each way moves neither the median nor the quartiles
    assert demo.paired_ratios([1.0, 1.0, 1.0, 1.0, 1.0], [0.5, 1.0, 0.25, 0.5, 0.5]) == (2.0, 0.0)
    ratio, spread = demo.paired_ratios([1.0, 1.0, 1.0], [0.5, 1.0, 0.25])  # ratios 2, 1, 4
    assert ratio == 2.0 and spread == pytest.approx((3.0 - 1.5) / 2.0)  # inclusive quartiles 1.5 and 3
    with pytest.raises(ValueError, match="one of each per round"):
        demo.paired_ratios([1.0, 1.0], [1.0])


@pytest.fixture(scope="module")
def fixture_model():
    from vlm_prune.evals.synthetic_vqa import make_split
    from vlm_prune.fixture import load

    model, processor = load()
    items = make_split("test", 4)
    inputs = processor(images=[it.image for it in items], text=[it.prompt for it in items], padding=True,
                       return_tensors="pt")
    return model, inputs


@pytest.mark.parametrize("spec, stages", [
    ("cls_attention:16", lambda n: [n - 128] * 3),  # before the LLM: every layer sees 16 of 144
    ("fastv:16", lambda n: [n, n - 128, n - 128]),  # after layer 1 of 3
    ("visionzip:72+fastv:16:layer=1", lambda n: [n - 72, n - 128, n - 128]),
])
def test_measure_speed_flops_ratio_is_of_the_lengths_each_layer_saw(fixture_model, spec, stages):
    model, inputs = fixture_model
    (row,) = demo.expand(spec, [16])
    speed = demo.measure_speed(model, inputs, lambda: row.patch(model), rounds=3, threads=1)
    assert api.get_handle(model) is None  # unpatched after
    n = inputs["input_ids"].shape[1]  # the padded batch: the longest row, 144 image tokens
    config = model.config.text_config
    assert speed.llm_lengths == stages(n)
    assert speed.flops_ratio == pytest.approx(prefill_flops(config, n).total / prefill_flops(config, stages(n)).total)
    assert speed.flops_ratio > 1
    samples = speed.samples
    assert [len(samples[v][m]) for v in ("unpruned", "pruned") for m in ("time", "llm")] == [3] * 4
    assert speed.llm_ratio == demo.paired_ratios(samples["unpruned"]["llm"], samples["pruned"]["llm"])[0]
    assert speed.e2e_ratio == demo.paired_ratios(samples["unpruned"]["time"], samples["pruned"]["time"])[0]
    assert all(0 < t for v in samples.values() for m in v.values() for t in m)


def test_measure_speed_without_rounds_gives_the_flops_ratio_only(fixture_model):
    model, inputs = fixture_model
    speed = demo.measure_speed(model, inputs, lambda: api.patch(model, "random", 36), rounds=0)
    assert speed.flops_ratio > 1 and speed.llm_ratio is None and speed.e2e_ratio is None and speed.rounds == 0


# -- runs on the fixture ------------------------------------------------------------------------------


def test_demo_runs_configuration_strings_and_pipelines(tmp_path, capsys):
    from vlm_prune.evals.synthetic_vqa import make_split
    from vlm_prune.fixture import evaluate, load

    specs = ["cls_attention:36", "visionzip:72+fastv:16:layer=1", "visionzip+transition"]
    rows = demo.run(threads=1, n=40, methods=specs, budgets=[16], out=tmp_path, timing_rounds=2)
    assert [(r["method"], r["keep"], r["kept"]) for r in rows] == [
        ("unpruned", 144, 144), ("cls_attention", 36, 36), ("visionzip:72+fastv", 16, 16),
        ("visionzip+transition", 16, 16)]
    assert [r.get("kept_stages") for r in rows] == [None, None, [72, 16], [32, 16]]
    assert [r["config"] for r in rows] == ["none", "cls_attention:36", "visionzip:72+fastv:16:layer=1",
                                           "visionzip:32+transition:16"]
    assert rows[0]["flops_ratio"] == 1.0 and all(r["flops_ratio"] > 1 for r in rows[1:])
    assert all(r["timing_rounds"] == 2 and r["llm_speedup"] > 0 and r["e2e_speedup"] > 0 for r in rows)
    # the same configuration through vlm_prune.patch scores the same (the demo's memoised processor changes nothing)
    model, processor = load()
    with torch.inference_mode():
        api.patch(model, "visionzip:72+fastv:16:layer=1")
        direct = evaluate(model, processor, make_split("test", 40), batch_size=50)
        api.unpatch(model)
    assert direct["accuracy"] == rows[2]["accuracy"]
    assert {p.name for p in tmp_path.iterdir()} == {"demo.md", "demo.json", "accuracy_vs_tokens.png",
                                                    "accuracy_vs_flops.png"}
    md = (tmp_path / "demo.md").read_text()
    assert "| visionzip:72+fastv | 16 | 72 → 16 |" in md and "| visionzip+transition | 16 | 32 → 16 |" in md
    assert "LLM FLOPs speed-up" in md and "measured LLM prefill speed-up" in md
    assert json.loads((tmp_path / "demo.json").read_text())[2]["config"] == "visionzip:72+fastv:16:layer=1"
    assert "| cls_attention | 36 |" in capsys.readouterr().out


def test_demo_cli_with_configs_and_no_timing(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["demo", "-n", "20", "--threads", "1", "--method", "random:8", "--config", "fopru",
                     "--budgets", "36", "--timing-rounds", "0", "--out", str(out)]) == 0
    rows = json.loads((out / "demo.json").read_text())
    assert [(r["method"], r["keep"]) for r in rows] == [("unpruned", 144), ("random", 8), ("fopru", 36)]
    lines = [line for line in (out / "demo.md").read_text().splitlines() if line.startswith(("| random", "| unp"))]
    assert len(lines) == 2 and all(line.endswith("| — | — |") for line in lines)  # not measured
    assert rows[0]["flops_ratio"] == 1.0 and rows[0]["llm_speedup"] is None
    assert "not measured (--timing-rounds 0)" in (out / "demo.md").read_text()
    assert (out / "accuracy_vs_tokens.png").is_file() or "plots need matplotlib" in capsys.readouterr().err
