"""The Python examples of README.md and docs/*.md run as written (on tiny models instead of
downloaded checkpoints) and give what their comments say; the ones that need a checkpoint or
vLLM at least compile, and README's links to docs/ point at files that exist."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
import torch

import vlm_prune

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def _block_in(text: str, heading: str, index: int = 0) -> str:
    """The `index`-th ```python block of the section of `text` that starts with `heading`
    (a "## " line; the section ends at the next "## " heading)."""
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + len(heading) + 2)
    section = text[start:end if end > 0 else None]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[index]


def _block(heading: str, index: int = 0) -> str:
    """The `index`-th ```python block of the README section that starts with `heading`."""
    return _block_in(README, heading, index)


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _commented(code: str, before: str) -> object:
    """The Python literal in the comment that follows `before` (on its line or the next)."""
    tail = code[code.index(before) + len(before):]
    comment = re.search(r"#\s*(\[.*?\])\s", tail, flags=re.S).group(1)
    return ast.literal_eval(comment)


def _patch_calls(code: str) -> list[ast.Call]:
    """The top-level `vlm_prune.patch(...)` calls of a block, in order."""
    return [node.value for node in ast.parse(code).body
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) == "vlm_prune.patch"]


# -- every example compiles; the links resolve ------------------------------------------------


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_python_block_compiles(path):
    blocks = _python_blocks(path.read_text())
    for i, code in enumerate(blocks):
        compile(code, f"{path.name} block {i}", "exec")


def test_readme_is_short_and_links_every_doc():
    assert len(README.splitlines()) <= 300
    assert DOCS, "docs/ holds the details"
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]*)?\)", README))
    assert linked == {p.relative_to(ROOT).as_posix() for p in DOCS}


def _anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (code blocks left out)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_files_and_headings(path):
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", path.read_text()):
        if "://" in target:
            continue
        linked = (path.parent / target) if target else path
        assert linked.exists(), f"{path.name}: {target}"
        if anchor:
            assert anchor in _anchors(linked.read_text()), f"{path.name}: {target}#{anchor}"


# -- README.md ------------------------------------------------------------------------------


def test_quick_start_runs_on_the_tiny_model_and_matches_its_comments():
    tiny_setup = _block("## Quick start", 1)
    quick_start = _block("## Quick start", 0)
    # the checkpoint download is the one line a machine without network cannot run
    runnable = "\n".join(line for line in quick_start.splitlines() if "from_pretrained" not in line)
    namespace: dict = {}
    exec(tiny_setup, namespace)
    namespace["image"] = namespace["tiny"].random_image(640, 480)
    model = namespace["model"]
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with torch.no_grad():
        reference = model(**namespace["processor"](images=[namespace["image"]], text=["USER: <image>\nWhat is shown? ASSISTANT:"],
                                                   return_tensors="pt")).logits
    exec(runnable, namespace)

    handle = namespace["handle"]
    assert handle.stats == _commented(quick_start, "handle.stats")
    kept = handle.kept_indices
    assert len(kept) == 1 and kept[0].shape == (64,) and bool((kept[0][1:] > kept[0][:-1]).all())
    assert set(handle.timings) == {"vision_s", "select_s", "positions_s"}
    assert vlm_prune.available_methods() == _commented(quick_start, "vlm_prune.available_methods()")
    assert namespace["out"].shape[0] == 1
    # unpatch and the scoped block left the model as it was
    assert vlm_prune.get_handle(model) is None and not handle.active
    with torch.no_grad():
        after = model(**namespace["inputs"]).logits
    torch.testing.assert_close(after, reference, rtol=0, atol=0)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


def test_methods_table_has_one_row_per_method():
    section = README[README.index("\n## Methods\n"):]
    section = section[:section.index("\n## ", 1)]
    rows = re.findall(r"^\| `(\w+)`", section, flags=re.M)
    assert sorted(rows) == vlm_prune.available_methods()


# -- docs/methods.md ----------------------------------------------------------------------------


def test_in_llm_examples_each_patch_a_deep_enough_model():
    from vlm_prune import tiny

    code = _block_in(_doc("methods.md"), "## In-LLM pruning (`transition`, `fastv`)")
    model, processor = tiny.llava(image_size=336, text_layers=16)  # 576 tokens; the last stage is after layer 12
    inputs = processor(images=[tiny.random_image(64, 48)], text=["USER: <image>\nWhat is it? ASSISTANT:"],
                       return_tensors="pt")
    calls = _patch_calls(code)
    assert len(calls) == 4
    for call in calls:
        handle = eval(compile(ast.Expression(call), "docs/methods.md", "eval"), {"vlm_prune": vlm_prune, "model": model})
        try:
            with torch.no_grad():
                model(**inputs)
            lengths = handle.layer_lengths
            assert len(lengths) == 16 and lengths[-1] < lengths[0], ast.unparse(call)
        finally:
            handle.remove()


def test_named_departure_lines_each_patch_a_tiny_llava_next():
    """Each line of the departures block, on a tiny LLaVA-NeXT (64 tokens per crop, a 5-layer
    tower for `layers=[-4, -3, -2]`, a 4-layer LLM for two `transition` stages); an int
    `keep` of 64 becomes 8 so that every line prunes something."""
    from vlm_prune import tiny

    code = _block_in(_doc("methods.md"), "## Options")
    calls = _patch_calls(code)
    assert len(calls) >= 10
    named = {kw.arg for call in calls for kw in call.keywords} - {"method", "keep"}
    for option in ("layers", "layout", "mode", "score", "rescale", "budget", "positions", "iga_layer", "ttv_softmax", "query"):
        assert option in named, option
    model, processor = tiny.llava_next(image_size=112, vision_layers=5, text_layers=4)
    inputs = processor(images=[tiny.random_image(160, 96)], text=["USER: <image>\nWhat is it? ASSISTANT:"],
                       return_tensors="pt")
    for call in calls:
        for kw in call.keywords:
            if kw.arg == "keep" and isinstance(kw.value, ast.Constant) and kw.value.value == 64:
                kw.value = ast.copy_location(ast.Constant(8), kw.value)
        handle = eval(compile(ast.Expression(call), "docs/methods.md", "eval"), {"vlm_prune": vlm_prune, "model": model})
        try:
            with torch.no_grad():
                model(**inputs)
            (stats,) = handle.stats
            assert 0 < stats["kept"] < stats["visual_tokens"], (ast.unparse(call), stats)
        finally:
            handle.remove()


# -- docs/kernels.md ----------------------------------------------------------------------------


def test_host_calls_example_counts_a_prefill(llava):
    from tests.conftest import llava_inputs

    model, processor = llava
    code = _block_in(_doc("kernels.md"), "## Bench and host calls", 0)
    assert "count_host_calls" in code
    namespace = {"model": model, "inputs": llava_inputs(processor, ["USER: <image>\nWhat? ASSISTANT:"], [(64, 48)])}
    with torch.no_grad():
        exec(code.replace("print(", "result = ("), namespace)
    ops, launches, reads, names = namespace["result"]
    assert ops > 10 and launches == 0 and reads >= 1 and sum(names.values()) == ops


# -- docs/guarantees.md -------------------------------------------------------------------------


def test_generate_modes_example_runs_on_a_patched_model():
    from vlm_prune import tiny

    code = _block_in(_doc("guarantees.md"), "## `generate()` modes")
    assert "num_beams" in code and "static" in code and "cache=first.cache" in code
    model, processor = tiny.llava(image_size=112)
    inputs = processor(images=[tiny.random_image(64, 48)], text=["USER: <image>\nWhat is it? ASSISTANT:"],
                       return_tensors="pt")
    with vlm_prune.pruned(model, "cls_attention", 16) as handle, torch.no_grad():
        namespace = {"model": model, "inputs": inputs, "processor": processor, "torch": torch,
                     "other_image": tiny.random_image(48, 64, seed=1)}
        exec(code.replace("max_new_tokens=30", "max_new_tokens=3"), namespace)
        assert handle.stats == [{"visual_tokens": 64, "kept": 16}]  # the third turn's new image
    # the later turns generated on the pruned cache, which grew by the unseen tokens only, the
    # new image pruned
    first, ids, third = namespace["first"], namespace["ids"], namespace["third"]
    assert third.shape[1] == ids.shape[1] + 3
    assert first.cache.get_seq_length() == ids.shape[1] - 2 * (64 - 16) + 2


def test_labels_example_scores_the_answer_on_a_pruned_model():
    from vlm_prune import tiny

    code = _block_in(_doc("guarantees.md"), "## A forward with `labels`")
    assert "labels=labels" in code
    model, processor = tiny.llava(image_size=112)
    inputs = processor(images=[tiny.random_image(64, 48)], text=["USER: <image>\nWhat is it? ASSISTANT: a red circle"],
                       return_tensors="pt")
    with vlm_prune.pruned(model, "cls_attention", 16), torch.no_grad():
        namespace = {"inputs": inputs, "model": model, "n_answer": 3}
        exec(code, namespace)
        logits = model(**inputs).logits
    answer = inputs["input_ids"][0, -3:]
    expected = torch.nn.functional.cross_entropy(logits[0, -4:-1], answer)
    torch.testing.assert_close(namespace["loss"], expected, rtol=1e-5, atol=1e-6)
