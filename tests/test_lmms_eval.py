"""`vlm-prune lmms-eval` and the pruned lmms-eval models (vlm_prune.lmms_eval_launcher).

The slow test runs the real lmms-eval, offline, on the shipped fixture model and a local task
(tests/lmms_tasks/: synthetic VQA in lmms-lab's TextVQA parquet layout), pruned through the
launcher and unpruned through lmms-eval's own command with the entry-point model, and checks
both against `vlm-prune eval` on the same parquet file: same answer per item, same score.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_prune.cli import main
from vlm_prune.fixture import DEFAULT_PATH as FIXTURE
from vlm_prune.lmms_eval_launcher import rewrite_args

TASKS = Path(__file__).parent / "lmms_tasks"
TASK = "vlm_prune_synthetic_vqa"
N = 24  # synthetic-VQA test questions


def test_rewrite_args_swaps_the_model_and_adds_prune():
    args = ["--model", "llava_hf", "--model_args", "pretrained=x,device_map=cpu", "--tasks", "pope"]
    assert rewrite_args(args, "cls_attention:64") == [
        "--model", "vlm_prune_llava_hf", "--model_args", "pretrained=x,device_map=cpu,prune=cls_attention:64",
        "--tasks", "pope"]
    # --name=value forms; an option list keeps its brackets, its other commas become ':'
    assert rewrite_args(["--tasks", "mme", "--model=qwen2_vl"], "pool:0.25:mode=subsample,positions=original") == [
        "--model", "vlm_prune_qwen2_vl", "--model_args", "prune=pool:0.25:mode=subsample:positions=original",
        "--tasks", "mme"]
    assert rewrite_args(["--model", "vlm_prune_qwen2_5_vl", "--model_args=pretrained=y"], "fastv:64:layers=[2,3]")[:4] \
        == ["--model", "vlm_prune_qwen2_5_vl", "--model_args", "pretrained=y,prune=fastv:64:layers=[2,3]"]
    with pytest.raises(ValueError, match="already holds prune="):
        rewrite_args(["--model", "llava_hf", "--model_args", "pretrained=x,prune=pool:0.5"], "pool:0.25")


@pytest.mark.parametrize("argv, message", [
    (["--prune", "bogus:16"], "unknown method 'bogus'"),
    (["--prune", "cls_attention"], "no keep for stage"),
])
def test_bad_prune_is_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["lmms-eval", *argv, "--", "--model", "llava_hf", "--tasks", "pope"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_model_vlm_prune_does_not_wrap_is_refused(capsys):
    assert main(["lmms-eval", "--prune", "cls_attention:64", "--", "--model", "llava_onevision", "--tasks", "mme"]) == 2
    err = capsys.readouterr().err
    assert "'llava_onevision'" in err and "llava_hf, qwen2_vl, qwen2_5_vl" in err


def test_without_lmms_eval_it_says_what_to_install():
    # a Python in which `import lmms_eval` fails as it does where the package is not installed
    code = ("import sys; sys.modules['lmms_eval'] = None; from vlm_prune.cli import main; "
            "sys.exit(main(['lmms-eval', '--prune', 'cls_attention:64', '--', '--model', 'llava_hf', '--tasks', 'x']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "pip install 'vlm-prune[lmms]'" in done.stderr


def test_recorder_counts_each_prefill_and_a_failed_one():
    import torch

    from vlm_prune import fixture
    from vlm_prune.evals import synthetic_vqa
    from vlm_prune.lmms_eval_launcher import PruneRecorder

    model, processor = fixture.load()
    items = synthetic_vqa.make_split("test", 3)
    recorder = PruneRecorder(model, "cls_attention:16", "test")

    def ask(item, bad=False):
        inputs = processor(images=[item.image], text=item.prompt, return_tensors="pt")
        if bad:  # one image placeholder for the image's 144 features: the model raises
            inputs.update(processor.tokenizer([item.prompt], return_tensors="pt"))
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)

    ask(items[0])
    with pytest.raises(ValueError, match="do not match"):
        ask(items[1], bad=True)
    ask(items[2])
    with torch.inference_mode():  # a plain forward with pixels (lmms-eval's loglikelihood) is a prefill too
        model(**processor(images=[items[0].image], text=items[0].prompt, return_tensors="pt"))
    summary = recorder.summary()
    assert summary["prefills"] == 3 and summary["failed_prefills"] == 1 and summary["prune"] == "cls_attention:16"
    assert summary["visual_tokens"] == 144 and summary["kept"] == 16
    assert all(r["prefill_s"] > 0 and "select_s" in r for r in recorder.records)
    # unpruned: the visual tokens counted from the prompt, kept = all
    import vlm_prune

    vlm_prune.unpatch(model)
    baseline = PruneRecorder(model, "none", "test")
    ask(items[0])
    assert baseline.summary()["visual_tokens"] == baseline.summary()["kept"] == 144 and baseline.handle is None


# ------------------------------------------------------------------------------ real runs


def _write_parquet(folder: Path, n: int) -> Path:
    """The first n synthetic-VQA test items as lmms-lab's TextVQA export has its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_prune.evals import synthetic_vqa

    rows = []
    for i, item in enumerate(synthetic_vqa.make_split("test", n)):
        png = io.BytesIO()
        item.image.save(png, format="PNG")
        rows.append({"question_id": f"q{i}", "question": item.question, "answers": [item.answer] * 10,
                     "image": {"bytes": png.getvalue(), "path": f"q{i}.png"}, "qtype": item.qtype})
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "synthetic_vqa.parquet")
    return folder


def _lmms(command: list[str], data: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # run in the data folder: the task reads synthetic_vqa.parquet from the current folder
    done = subprocess.run(command, cwd=data, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _lmms_outputs(out: Path) -> tuple[dict, list[str], Path]:
    """(results JSON, answer per item in file order, the results file) of one lmms-eval run."""
    [results] = list(out.rglob("*_results.json"))
    [samples] = list(out.rglob(f"*_samples_{TASK}.jsonl"))
    answers = {s["doc_id"]: s["filtered_resps"] for s in map(json.loads, samples.read_text().splitlines())}
    return json.loads(results.read_text()), [answers[i].strip() for i in range(len(answers))], results


def _eval_outputs(out: Path, config: str) -> tuple[float, list[str]]:
    folder = out / config / "textvqa"
    records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"q{i}" for i in range(N)]
    return json.loads((folder / "summary.json").read_text())["score"], [r["prediction"] for r in records]


@pytest.mark.slow
def test_lmms_eval_equals_vlm_prune_eval_pruned_and_unpruned(tmp_path):
    assert importlib.util.find_spec("lmms_eval"), "no lmms-eval: run scripts/setup_env.sh (make test does)"
    from vlm_prune.evals.cli import main as eval_main

    data = _write_parquet(tmp_path / "data", N)
    # vlm-prune eval on the same file: the question alone (the fixture's chat template makes the prompt), one token
    assert eval_main(["--model", str(FIXTURE), "--compare", "none", "cls_attention:16", "--bench", "textvqa",
                      "--data", str(data), "--prompt-suffix", "", "--max-new-tokens", "1", "--device", "cpu",
                      "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    task = ["--include_path", str(TASKS), "--tasks", TASK, "--device", "cpu", "--log_samples"]
    model_args = f"pretrained={FIXTURE},device_map=cpu"

    # pruned, through the launcher: lmms-eval's llava_hf swapped for its pruned twin
    pruned_out = tmp_path / "lmms-pruned"
    done = _lmms([sys.executable, "-m", "vlm_prune.cli", "lmms-eval", "--prune", "cls_attention:16", "--",
                  "--model", "llava_hf", "--model_args", model_args, "--output_path", str(pruned_out), *task],
                 data, tmp_path)
    results, answers, results_file = _lmms_outputs(pruned_out)
    score, predictions = _eval_outputs(tmp_path / "eval", "cls_attention-16")
    assert answers == predictions
    assert results["results"][TASK]["accuracy,none"] == pytest.approx(score, abs=1e-9)
    assert results["config"]["model"] == "vlm_prune_llava_hf"
    assert "prune=cls_attention:16" in results["config"]["model_args"]
    # the stats: their means in lmms-eval's results, every prefill in the file beside them
    throughput = results["throughput"]
    assert throughput["avg_vlm_prune_visual_tokens"] == 144 and throughput["avg_vlm_prune_kept"] == 16
    assert throughput["avg_vlm_prune_failed_prefills"] == 0 and throughput["avg_vlm_prune_prefill_s"] > 0
    stats_file = results_file.with_name(results_file.name.replace("_results.json", "_vlm_prune.json"))
    assert f"wrote {stats_file}" in done.stdout
    stats = json.loads(stats_file.read_text())
    assert stats["lmms_eval_model"] == "vlm_prune_llava_hf" and stats["model"] == "LlavaForConditionalGeneration"
    assert stats["summary"]["prune"] == "cls_attention:16" and stats["summary"]["prefills"] == N
    assert all(r["rows"] == 1 and r["visual_tokens"] == 144 and r["kept"] == 16 and r["prefill_s"] > 0
               and {"vision_s", "select_s", "positions_s"} <= set(r) for r in stats["prefills"])

    # unpruned, through lmms-eval's own command: the entry-point model with prune=none
    plain_out = tmp_path / "lmms-none"
    _lmms([str(Path(sys.executable).with_name("lmms-eval")), "--model", "vlm_prune_llava_hf",
           "--model_args", f"{model_args},prune=none", "--output_path", str(plain_out), *task], data, tmp_path)
    results, answers, _ = _lmms_outputs(plain_out)
    score, predictions = _eval_outputs(tmp_path / "eval", "none")
    assert answers == predictions
    assert results["results"][TASK]["accuracy,none"] == pytest.approx(score, abs=1e-9)
    assert results["throughput"]["avg_vlm_prune_kept"] == results["throughput"]["avg_vlm_prune_visual_tokens"] == 144
    assert not list(plain_out.rglob("*_vlm_prune.json"))  # the file beside the results is the launcher's
