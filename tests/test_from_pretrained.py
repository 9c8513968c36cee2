"""Config-driven loading (vlm_prune/loading.py): `vlm_prune.save_pretrained` writes the active
pruning into config.json's `vlm_prune` block (the form the vLLM plugin reads) and
`vlm_prune.from_pretrained` applies it on load. Each loaded model is compared with the in-memory
original patched by hand: the same configuration, the same logits bit for bit, the same greedy
tokens. On the shipped fixture (a trained LLaVA) and a tiny Qwen2-VL; the slow test serves the
same saved folder with vLLM (plugin active through config.json alone)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import vlm_prune
from vlm_prune import fixture, tiny
from vlm_prune.config import PruneConfig
from vlm_prune.evals import synthetic_vqa as sv

from .test_vllm import VLLM_PYTHON, run_vllm, same_tokens

ROOT = Path(__file__).resolve().parents[1]
REFUSED = "vLLM's plugin would refuse"  # the start of save_pretrained's warning


@pytest.fixture(scope="module")
def models():
    """name -> (model, processor, inputs of two prompts)."""
    fx, fx_processor = fixture.load()
    items = sv.make_split("test", 2)
    fx_inputs = fx_processor(images=[it.image for it in items], text=[it.prompt for it in items],
                             padding=True, return_tensors="pt")
    qwen, qwen_processor = tiny.qwen2_vl()
    qwen_inputs = qwen_processor(images=[tiny.random_image(112, 84, seed=0), tiny.random_image(84, 140, seed=1)],
                                 text=[tiny.qwen_prompt("What is it?"), tiny.qwen_prompt("And this one?")],
                                 padding=True, return_tensors="pt")
    return {"fixture": (fx, fx_processor, fx_inputs), "qwen": (qwen, qwen_processor, qwen_inputs)}


@pytest.fixture(autouse=True)
def _unpatched(models):
    """Every test starts and ends with the in-memory originals unpatched."""
    for model, _, _ in models.values():
        vlm_prune.unpatch(model)
    yield
    for model, _, _ in models.values():
        vlm_prune.unpatch(model)


def outputs(model, inputs, new_tokens=4):
    """(logits of the prompt, greedy continuation) of a batch."""
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return logits, out[:, inputs["input_ids"].shape[1]:]


def assert_same(loaded, reference, inputs):
    got_logits, got_tokens = outputs(loaded, inputs)
    ref_logits, ref_tokens = outputs(reference, inputs)
    assert torch.equal(got_logits, ref_logits)
    assert torch.equal(got_tokens, ref_tokens)


def block_in(folder):
    return json.loads((Path(folder) / "config.json").read_text()).get("vlm_prune")


def save(model, folder, processor):
    """vlm_prune.save_pretrained; returns the warnings about vLLM it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vlm_prune.save_pretrained(model, folder, processor)
    return [str(w.message) for w in caught if REFUSED in str(w.message)]


@pytest.fixture(scope="module")
def saved_fixture(models, tmp_path_factory):
    """A folder of the fixture saved patched with cls_attention, 16 of 144 tokens."""
    model, processor, _ = models["fixture"]
    folder = tmp_path_factory.mktemp("fixture_pruned")
    vlm_prune.patch(model, "cls_attention", 16)
    try:
        assert save(model, folder, processor) == []
    finally:
        vlm_prune.unpatch(model)
    return folder


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, block", [
    ("fixture", dict(method="cls_attention", keep=16), {"method": "cls_attention", "keep": 16}),
    ("fixture", dict(method="cls_attention", keep=0.125, layers=[-3, -2]),
     {"method": "cls_attention", "keep": 0.125, "layers": [-3, -2]}),
    ("qwen", dict(method="dct", keep=0.25), {"method": "dct", "keep": 0.25}),
    ("qwen", dict(method="visionzip", keep=8, positions="original"),
     {"method": "visionzip", "keep": 8, "positions": "original"}),
])
def test_saved_block_loads_to_the_same_pruned_model(models, tmp_path, name, kwargs, block):
    model, processor, inputs = models[name]
    handle = vlm_prune.patch(model, **kwargs)
    assert save(model, tmp_path, processor) == []  # a configuration vLLM serves: no warning
    assert block_in(tmp_path) == block  # exactly what --hf-overrides '{"vlm_prune": ...}' takes

    loaded = vlm_prune.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert vlm_prune.get_handle(loaded).config == handle.config
    assert loaded.config.vlm_prune == block
    assert_same(loaded, model, inputs)  # the reference: the original, patched by hand
    kept = [s["kept"] for s in vlm_prune.get_handle(loaded).stats]
    assert kept == [s["kept"] for s in handle.stats] and all(k < s["visual_tokens"] for k, s in
                                                             zip(kept, handle.stats))


@pytest.mark.parametrize("name, config, block", [
    ("fixture", "visionzip:32+fastv:16:layer=1",
     {"method": "visionzip+fastv", "keep": [32, 16], "stage_options": [{}, {"layer": 1}]}),
    ("qwen", "visionzip:16+transition:8", {"method": "visionzip+transition", "keep": [16, 8]}),
])
def test_a_pipeline_round_trips_in_transformers(models, tmp_path, name, config, block):
    model, processor, inputs = models[name]
    handle = vlm_prune.patch(model, config)
    save(model, tmp_path, processor)  # saved all the same (vLLM's plugin refuses in-LLM stages: a warning)
    assert block_in(tmp_path) == block
    loaded = vlm_prune.from_pretrained(tmp_path)
    assert vlm_prune.get_handle(loaded).config == handle.config
    assert_same(loaded, model, inputs)


def test_a_transformers_only_method_is_saved_with_vllms_reason(models, tmp_path):
    model, processor, inputs = models["fixture"]
    vlm_prune.patch(model, "fastv", 16, layer=1)
    refused = save(model, tmp_path, processor)
    assert len(refused) == 1 and refused[0].startswith(f"saved {tmp_path} for transformers; {REFUSED} its "
                                                       "vlm_prune block: vlm_prune: method 'fastv' prunes inside the LLM")
    assert block_in(tmp_path) == {"method": "fastv", "keep": 16, "layer": 1}
    assert_same(vlm_prune.from_pretrained(tmp_path), model, inputs)


# -- prune= ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prune, kwargs", [
    ("pool:0.25", dict(method="pool", keep=0.25)),
    ({"method": "random", "keep": 8, "seed": 3}, dict(method="random", keep=8, seed=3)),
    ("visionzip:32+fastv:16:layer=1", dict(method="visionzip+fastv", keep=(32, 16), stage_options=[{}, {"layer": 1}])),
])
def test_prune_overrides_the_block(models, saved_fixture, tmp_path, prune, kwargs):
    model, processor, inputs = models["fixture"]
    loaded = vlm_prune.from_pretrained(saved_fixture, prune=prune)
    handle = vlm_prune.patch(model, **kwargs)
    assert vlm_prune.get_handle(loaded).config == handle.config
    assert_same(loaded, model, inputs)
    # the block now says what was applied: saving writes it, loading that folder gives it back
    assert loaded.config.vlm_prune == vlm_prune.loading.block_of(handle.config)
    save(loaded, tmp_path, processor)
    assert block_in(tmp_path) == loaded.config.vlm_prune
    loaded.save_pretrained(tmp_path / "plain")  # transformers' own save writes model.config's block too
    assert block_in(tmp_path / "plain") == loaded.config.vlm_prune
    assert vlm_prune.get_handle(vlm_prune.from_pretrained(tmp_path)).config == handle.config
    assert block_in(saved_fixture) == {"method": "cls_attention", "keep": 16}  # the source is untouched


def test_prune_false_loads_unpatched_and_forgets_the_block(models, saved_fixture, tmp_path):
    model, processor, inputs = models["fixture"]
    loaded = vlm_prune.from_pretrained(saved_fixture, prune=False)
    assert vlm_prune.get_handle(loaded) is None and not hasattr(loaded.config, "vlm_prune")
    assert_same(loaded, model, inputs)  # the original, unpatched
    loaded.save_pretrained(tmp_path)  # a plain save does not bring the block back
    assert block_in(tmp_path) is None
    assert vlm_prune.get_handle(vlm_prune.from_pretrained(tmp_path)) is None


def test_unpatched_models_save_without_a_block(models, saved_fixture, tmp_path):
    model, processor, inputs = models["fixture"]
    loaded = vlm_prune.from_pretrained(saved_fixture, dtype=torch.float32)  # kwargs reach transformers
    vlm_prune.unpatch(loaded)
    assert loaded.config.vlm_prune  # stale in memory ...
    assert save(loaded, tmp_path, processor) == []
    assert block_in(tmp_path) is None  # ... not on disk
    reloaded = vlm_prune.from_pretrained(tmp_path)
    assert vlm_prune.get_handle(reloaded) is None
    assert_same(reloaded, model, inputs)


# -- bad blocks: the errors of vlm_prune.patch, before any weight is read --------------------


@pytest.fixture
def config_only(saved_fixture, tmp_path):
    """write(block) -> a folder holding only the fixture's config.json with that block: loading
    its weights would fail with OSError, so a ValueError shows the block was checked first."""
    def write(block, **entries):
        config = json.loads((saved_fixture / "config.json").read_text())
        config.update(vlm_prune=block, **entries)
        (tmp_path / "config.json").write_text(json.dumps(config))
        return tmp_path

    return write


BAD_BLOCKS = [
    ({"method": "cls_atention", "keep": 16}, ValueError,
     "unknown method 'cls_atention'; available: ['cdpruner', 'cls_attention', "),
    ({"method": "cls_attention", "keep": 0}, ValueError, "keep=0 must be >= 1 when an int"),
    ({"method": "cls_attention", "keep": "16"}, TypeError, "keep='16' (str) must be an int"),
    ({"method": "cls_attention", "keep": 16, "positions": "middle"}, ValueError,
     "positions='middle' is not allowed; choose one of ['renumber', 'original']"),
    ({"method": "pool", "keep": 16, "sharpness": 2}, ValueError, "unknown option(s) ['sharpness'] for method 'pool'"),
    ({"method": "fastv+visionzip", "keep": [32, 16]}, ValueError, "method='fastv+visionzip': a pipeline is "),
    ({"method": "visionzip+fastv", "keep": 16}, ValueError, "keep=16: a pipeline of 2 stages"),
    ({"keep": 16}, ValueError, "vlm_prune={'keep': 16} must be an object with at least 'method' and 'keep'"),
    ("cls_attention:16", ValueError, "must be an object with at least 'method' and 'keep'"),
]


@pytest.mark.parametrize("block, error, message", BAD_BLOCKS)
def test_a_bad_block_fails_before_loading(config_only, block, error, message):
    folder = config_only(block)
    with pytest.raises(error) as caught:
        vlm_prune.from_pretrained(folder)
    assert str(caught.value).startswith(f"{folder}: config.json's vlm_prune block: ")
    assert message in str(caught.value)
    if isinstance(block, dict):  # the same message as vlm_prune.patch / the vLLM plugin's reading of the block
        with pytest.raises(error, match=re.escape(message)):
            vlm_prune.from_pretrained(folder, prune=block)


def test_the_probe_folder_would_fail_to_load(config_only):
    with pytest.raises(OSError):  # a valid block goes on to the weights, which are not there
        vlm_prune.from_pretrained(config_only({"method": "cls_attention", "keep": 16}))
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported; supported model_type values: "
                                         r"\['llava', 'llava_next', 'qwen2_5_vl'"):
        vlm_prune.from_pretrained(config_only({"method": "cls_attention", "keep": 16}, model_type="llama"))


@pytest.mark.parametrize("prune, error, message", [
    ("cls_attention:0", ValueError, "prune='cls_attention:0': keep=0 must be >= 1"),
    ("cls_atention:16", ValueError, "prune='cls_atention:16': unknown method 'cls_atention'"),
    ("cls_attention", TypeError, "prune='cls_attention': patch() needs keep= for method 'cls_attention'"),
    ({"method": "cls_attention", "keep": 16, "stage_options": [{}]}, ValueError,
     "stage_options applies to pipelines"),
    (64, TypeError, "prune=64: pass None (the checkpoint's vlm_prune block), False (unpatched), a dict"),
    (True, TypeError, "prune=True: pass None"),
])
def test_a_bad_prune_argument_fails_before_loading(config_only, prune, error, message):
    with pytest.raises(error, match=re.escape(message)):
        vlm_prune.from_pretrained(config_only({"method": "cls_attention", "keep": 16}), prune=prune)


def test_what_needs_the_model_fails_after_loading_with_patchs_message(saved_fixture, tmp_path):
    folder = tmp_path / "deep"
    shutil.copytree(saved_fixture, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vlm_prune"] = {"method": "fastv", "keep": 16, "layer": 5}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape("layer=5 is outside [1, 2] for a decoder of 3 layers")):
        vlm_prune.from_pretrained(folder)


# -- docs/loading.md ---------------------------------------------------------------------------


def test_the_docs_example_runs_as_written(tmp_path, monkeypatch):
    code = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "loading.md").read_text(), flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "docs/loading.md", "exec"), scope)
    handle = vlm_prune.get_handle(scope["model"])
    assert handle.config == PruneConfig("cls_attention", 16)
    assert block_in(tmp_path / "fixture-pruned") == {"method": "cls_attention", "keep": 16}
    assert [s["kept"] for s in handle.stats] == [16]  # the example's generate ran pruned


# -- vLLM serves the same folder ---------------------------------------------------------------


@pytest.mark.slow
def test_vllm_serves_the_saved_folder_pruned_as_transformers_does(saved_fixture):
    """One engine, no --hf-overrides: config.json's block alone turns the plugin on; its greedy
    tokens equal those of vlm_prune.from_pretrained on the same folder, with the pruned count of
    prompt tokens."""
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm_env.sh` (make test does)")
    from transformers import AutoProcessor

    questions = ["what color is the circle ?", "what shape is at the middle-left ?", "how many shapes are there ?"]
    requests = [{"prompt": sv.prompt(q), "image": [168, 168, seed]} for seed, q in enumerate(questions)]
    # the fixture's positions stop at 512 (run_llm's default max_model_len is 1024)
    got = run_vllm(saved_fixture, None, requests=requests, max_tokens=4, llm_kwargs={"max_model_len": 512})
    model = vlm_prune.from_pretrained(saved_fixture)
    processor = AutoProcessor.from_pretrained(saved_fixture)
    for g, request in zip(got, requests):
        inputs = processor(images=[tiny.random_image(*request["image"])], text=[request["prompt"]],
                           return_tensors="pt")
        _, tokens = outputs(model, inputs)
        assert same_tokens(g["tokens"], tokens[0].tolist()), (g, tokens)
        assert g["prompt_tokens"] == inputs["input_ids"].shape[1] - (144 - 16)  # pruned by the plugin
