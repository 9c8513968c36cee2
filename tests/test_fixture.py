"""The shipped fixture model (and its model card), its training tool (tools/train_fixture.py,
outside the package) and the synthetic VQA benchmark."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import vlm_prune
from tools import train_fixture
from vlm_prune import fixture
from vlm_prune.evals import synthetic_vqa as sv

ROOT = Path(__file__).resolve().parent.parent


def test_splits_are_deterministic_and_distinct():
    a, b = sv.make_split("test", 12), sv.make_split("test", 12)
    assert [(x.question, x.answer, x.qtype) for x in a] == [(x.question, x.answer, x.qtype) for x in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    val = sv.make_split("validation", 12)
    assert [x.question for x in val] != [x.question for x in a]
    assert [x.question for x in sv.make_split("test", 6)] == [x.question for x in a[:6]]  # prefix
    assert {x.qtype for x in sv.make_split("test", 60)} == set(sv.QTYPES)
    assert all(x.answer in sv.ANSWER_WORDS and x.image.size == (168, 168) for x in a)


def test_grounding_targets_name_where_each_relpos_object_is():
    rng = np.random.default_rng(0)
    checked = 0
    while checked < 20:
        scene = sv.sample_scene(rng, (2, 4))
        qa = sv.ask(scene, "relpos", rng)
        if qa is None:
            continue
        words = (qa[0] + " answer :").split()
        first, second = ({o.color: o for o in scene}[words[i]] for i in (2, 9))
        assert (words[3], words[10]) == (first.shape, second.shape)
        assert [i for i, _ in train_fixture._object_words(words)] == [2, 3, 9, 10]
        got = [train_fixture._grounding_target({o.color: o for o in scene}[c], "column") for _, c in train_fixture._object_words(words)]
        assert got == [sv.CELLS[3 + first.col]] * 2 + [sv.CELLS[3 + second.col]] * 2
        assert train_fixture._grounding_target(first, "cell") == sv.CELLS[first.cell]
        # the answer is what the two column targets imply
        assert qa[1] == ("left" if first.col < second.col else "right")
        checked += 1


def test_training_runs_every_stage_and_saves_a_loadable_model(tmp_path):
    """A few steps of each stage (V, G, L with every auxiliary loss), then save + reload + test."""
    log = []
    metrics = train_fixture.train(
        tmp_path / "fx", v_steps=2, g_steps=2, l_steps=2, batch=4, l_batch=2, questions_per_image=6,
        eval_every=100, n_val=6, n_test=6, dense=0.5, ground=1.0, ground_target="column", pos_aux=0.5,
        log=lambda *a, **k: log.append(a[0]),
    )
    assert any(line.startswith("[V") for line in log) and any(line.startswith("[G") for line in log)
    assert metrics["n"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["training"]["g_steps"] == 2 and metrics["training"]["pos_aux"] == 0.5
    model, processor = fixture.load(tmp_path / "fx")
    assert model.config.image_seq_length == 144
    assert json.loads((tmp_path / "fx" / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]


def test_training_is_a_tool_the_package_never_imports(tmp_path, capsys):
    """tools/train_fixture.py runs as a script from anywhere; no module of the installed package
    (vlm_prune/, kernels/, patches/, evals/) imports it; `python -m vlm_prune.fixture train` says
    where the training went."""
    for folder in ("vlm_prune", "kernels", "patches", "evals"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n == "tools" or n.startswith("tools.") or "train_fixture" in n for n in names), path
    assert not hasattr(fixture, "train") and hasattr(train_fixture, "train")
    with pytest.raises(SystemExit) as exit_info:
        fixture.main(["train", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "tools/train_fixture.py train" in capsys.readouterr().err
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "train_fixture.py"), "train", "--help"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "--init-from" in run.stdout and "--g-steps" in run.stdout


def test_load_says_which_files_are_missing(tmp_path, monkeypatch):
    """No hub lookup (a path that is not a folder reads as a hub id to from_pretrained): a clear
    FileNotFoundError, and for the default folder one that says the install lacks the model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"no fixture model at .*config\.json, model\.safetensors"):
        fixture.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no fixture model at llava-hf/not-a-folder"):
        fixture.load("llava-hf/not-a-folder")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"\(model\.safetensors, processor_config\.json"):
        fixture.load(tmp_path)
    monkeypatch.setattr(fixture, "DEFAULT_PATH", tmp_path / "fixture_model")
    with pytest.raises(FileNotFoundError, match=r"lacks its package data vlm_prune/fixture_model/"):
        fixture.load()


def test_model_card_sits_beside_the_weights_and_quotes_metrics_json():
    """vlm_prune/fixture_model/README.md: its metrics table is metrics.json's, its training
    commands parse with tools/train_fixture.py's options."""
    card = (fixture.DEFAULT_PATH / "README.md").read_text()
    recorded = json.loads((fixture.DEFAULT_PATH / "metrics.json").read_text())
    lines = card.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("| accuracy |")))
    columns = [c.strip() for c in lines[at].strip("|").split("|")]
    values = [float(c.strip(" *")) for c in lines[at + 2].strip("|").split("|")]
    assert round(100 * recorded["accuracy"], 1) == values[0]
    assert dict(zip(columns[1:], values[1:])) == {q: round(100 * a, 2) for q, a in recorded["per_qtype"].items()}
    commands = re.findall(r"python tools/train_fixture\.py (train .*?)(?<!\\)\n", card, flags=re.S)
    assert len(commands) == 3
    for command in commands:
        args = train_fixture.build_parser().parse_args(command.replace("\\\n", " ").split())
        assert args.init_parts == "all" and args.threads == 1


def test_fixture_loads_offline_in_both_layouts(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = fixture.load()
    assert model.config.model_type == "llava" and model.config.image_seq_length == 144
    keys = load_file(fixture.DEFAULT_PATH / "model.safetensors").keys()
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)  # the layout vLLM loads
    assert not any(k.startswith("vision_tower.embeddings") for k in keys)
    item = sv.make_split("test", 1)[0]
    inputs = processor(images=[item.image], text=[item.prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144


@pytest.mark.slow
def test_shipped_weights_reproduce_the_recorded_accuracy():
    recorded = json.loads((fixture.DEFAULT_PATH / "metrics.json").read_text())
    model, processor = fixture.load()
    result = fixture.evaluate(model, processor, sv.make_split(recorded["split"], recorded["n"], seed=recorded["seed"]))
    assert result["accuracy"] == recorded["accuracy"]
    assert result["per_qtype"] == recorded["per_qtype"]


@pytest.mark.slow
def test_the_benchmark_separates_methods():
    """Orderings with margins, not exact numbers: [CLS]-attention keeps what random and pooling
    lose at 16 of 144 tokens (observed on n=600: 70.0 vs 49.7 / 40.5, unpruned 97.8)."""
    model, processor = fixture.load()
    items = sv.make_split("test", 400)
    accuracy = {"unpruned": fixture.evaluate(model, processor, items)["accuracy"]}
    for method in ("cls_attention", "random", "pool"):
        with vlm_prune.pruned(model, method, 16):
            accuracy[method] = fixture.evaluate(model, processor, items)["accuracy"]
    assert accuracy["cls_attention"] >= accuracy["random"] + 0.06
    assert accuracy["cls_attention"] >= accuracy["pool"] + 0.06
    assert accuracy["unpruned"] >= accuracy["cls_attention"] - 0.02
