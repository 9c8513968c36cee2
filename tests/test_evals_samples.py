"""Small sample folders in each benchmark's published format (built here, used by the
end-to-end tests too), and tests that the loaders read them and name the file and row of bad data."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import pytest

from vlm_prune import tiny
from vlm_prune.evals import data as data_mod
from vlm_prune.evals.data import DataError
from vlm_prune.evals.tasks import TASKS, get_task, load_items

# items each sample folder holds (no --limit; MMBench without circular)
EXPECTED = {"vqav2": 3, "gqa": 3, "textvqa": 3, "pope": 6, "mme": 6, "scienceqa_img": 2, "mmbench": 3}


def _img(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tiny.random_image(48 + 8 * seed, 40, seed=seed).save(path)
    return path


def _b64(seed: int) -> str:
    buf = io.BytesIO()
    tiny.random_image(40, 48, seed=seed).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_vqav2(root: Path) -> None:
    qs = [{"question_id": 100 + i, "image_id": i, "question": q} for i, q in
          enumerate(["How many dogs?", "What color is the car?", "Is it raining?"])]
    answers = [["2"] * 6 + ["two"] * 2 + ["3"] * 2, ["red"] * 10, ["no"] * 7 + ["yes"] * 3]
    _dump(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": qs})
    _dump(root / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": q["question_id"], "image_id": q["image_id"], "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(ans)]}
        for q, ans in zip(qs, answers)]})
    for i in range(3):
        _img(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)


def write_gqa(root: Path) -> None:
    _dump(root / "testdev_balanced_questions.json", {
        f"20{i}": {"imageId": f"n{i}", "question": q, "answer": a}
        for i, (q, a) in enumerate([("Is the cup on the left?", "yes"), ("What is on the table?", "cup"), ("Which color is the wall?", "white")])})
    for i in range(3):
        _img(root / "images" / f"n{i}.jpg", 10 + i)


def write_textvqa(root: Path) -> None:
    data = [{"question_id": 34602 + i, "question": q, "image_id": f"abc{i}", "answers": [a] * 10}
            for i, (q, a) in enumerate([("what brand is this?", "nokia"), ("what number?", "7"), ("what does it say?", "stop")])]
    _dump(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "data": data})
    for i in range(3):
        _img(root / "train_images" / f"abc{i}.jpg", 20 + i)


def write_pope(root: Path) -> None:
    for s, split in enumerate(["random", "popular", "adversarial"]):
        lines = [{"question_id": q + 1, "image": f"COCO_val2014_{q:012d}.jpg",
                  "text": f"Is there a {['dog', 'cat'][q]} in the image?", "label": ["yes", "no"][q]} for q in range(2)]
        (root / f"coco_pope_{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"coco_pope_{split}.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for q in range(2):
        _img(root / "val2014" / f"COCO_val2014_{q:012d}.jpg", 30 + q)


def write_mme(root: Path) -> None:
    base = root / "MME_Benchmark_release_version"
    pair = "Is there a {} in this image? Please answer yes or no.\tYes\nIs there a tree in this image? Please answer yes or no.\tNo\n"
    _img(base / "existence" / "000000006040.jpg", 40)
    (base / "existence" / "000000006040.txt").write_text(pair.format("dog"))
    _img(base / "artwork" / "images" / "10002.jpg", 41)
    (base / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (base / "artwork" / "questions_answers_YN" / "10002.txt").write_text(pair.format("painting"))
    _img(base / "code_reasoning" / "0020.png", 42)
    (base / "code_reasoning" / "0020.txt").write_text("Does this code print 3? Please answer yes or no.\tYes\n"
                                                      "Does this code print 5? Please answer yes or no.\tNo\n")


def write_scienceqa(root: Path) -> None:
    problems = {
        "5": {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "", "image": "image.png", "split": "test"},
        "7": {"question": "What is the capital?", "choices": ["Rome", "Paris", "Oslo"], "answer": 0, "hint": "A map of Italy.", "image": "image.png", "split": "test"},
        "9": {"question": "Text only?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": None, "split": "test"},
        "11": {"question": "Validation?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png", "split": "val"},
    }
    _dump(root / "problems.json", problems)
    _dump(root / "pid_splits.json", {"train": [], "val": ["11"], "test": ["5", "7", "9"]})
    for pid in ("5", "7"):
        _img(root / "images" / "test" / pid / "image.png", 50 + int(pid))
    _img(root / "images" / "val" / "11" / "image.png", 61)


MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category", "comment", "split"]


def mmbench_rows() -> list[list[str]]:
    return [
        ["0", "What is shown?", "nan", "a cat", "a dog", "a cow", "a pig", "B", "object", _b64(70), "x", "y", "", "dev"],
        ["1", "Which side?", "The image shows a road.", "left", "right", "middle", "", "C", "spatial", _b64(71), "x", "y", "", "dev"],
        ["2", "Same image, other question?", "", "yes", "no", "", "", "A", "object", "0", "x", "y", "", "dev"],  # image of row 0
    ]


def write_mmbench(root: Path, rows: list[list[str]] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "MMBench_DEV_EN.tsv"
    path.write_text("\n".join("\t".join(r) for r in [MMBENCH_HEADER] + (rows or mmbench_rows())) + "\n")
    return path


WRITERS = {"vqav2": write_vqav2, "gqa": write_gqa, "textvqa": write_textvqa, "pope": write_pope,
           "mme": write_mme, "scienceqa_img": write_scienceqa, "mmbench": write_mmbench}


def write_all(data: Path) -> Path:
    """Every benchmark's sample folder under data/<Task.folder>/."""
    for name, write in WRITERS.items():
        write(data / TASKS[name].folder)
    return data


@pytest.fixture
def data(tmp_path):
    return write_all(tmp_path / "data")


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", list(WRITERS))
def test_loaders_read_published_formats(data, name):
    items, errors = load_items(get_task(name), data)
    assert errors == [] and len(items) == EXPECTED[name]
    assert len({it.id for it in items}) == len(items)
    for it in items:  # every image opens, every labelled item has a target
        assert data_mod.open_image(it.image, it.where).mode == "RGB"
        assert it.target is not None and it.question


def test_loader_contents(data):
    vqa = load_items(get_task("vqav2"), data)[0]
    assert vqa[0].id == "100" and vqa[0].target[:6] == ["2"] * 6 and len(vqa[0].target) == 10
    assert vqa[0].image.name == "COCO_val2014_000000000000.jpg"
    pope = load_items(get_task("pope"), data, limit=1)[0]  # --limit applies per split
    assert [it.id for it in pope] == ["random/1", "popular/1", "adversarial/1"]
    mme = load_items(get_task("mme"), data)[0]
    assert {it.meta["category"] for it in mme} == {"existence", "artwork", "code_reasoning"}
    assert len(load_items(get_task("mme"), data, limit=2)[0]) == 4  # 2 images, both questions each
    sqa = load_items(get_task("sqa"), data)[0]
    assert [it.id for it in sqa] == ["5", "7"] and sqa[0].target == "B"
    assert sqa[1].question == "Context: A map of Italy.\nWhat is the capital?\nA. Rome\nB. Paris\nC. Oslo"
    assert len(load_items(get_task("sqa"), data, {"sqa_split": "val"})[0]) == 1
    mmb = load_items(get_task("mmbench"), data)[0]
    assert mmb[0].question == "What is shown?\nA. a cat\nB. a dog\nC. a cow\nD. a pig"  # "nan" hint dropped
    assert mmb[1].question.startswith("The image shows a road.\nWhich side?") and list(mmb[1].meta["options"]) == list("ABC")
    assert mmb[2].image == mmb[0].image  # the image referenced by index


def test_mmbench_circular_rotations(data):
    items = load_items(get_task("mmbench"), data, {"mmbench_circular": True})[0]
    assert len(items) == 4 + 3 + 2
    q1 = [it for it in items if it.group == "1"]
    # answer C ("middle"): rotation k shows option i's text from (i + k) mod 3
    assert [(it.meta["options"], it.target) for it in q1] == [
        ({"A": "left", "B": "right", "C": "middle"}, "C"),
        ({"A": "right", "B": "middle", "C": "left"}, "B"),
        ({"A": "middle", "B": "left", "C": "right"}, "A"),
    ]
    assert [it.id for it in q1] == ["1", "1@1", "1@2"]


def test_parquet_export_columns(tmp_path, monkeypatch):
    """lmms-eval parquet rows (read through pyarrow when installed) map to the same items."""
    (tmp_path / "pope" / "data").mkdir(parents=True)
    (tmp_path / "pope" / "data" / "test-00000.parquet").write_bytes(b"")
    rows = [{"question_id": "1", "question": "Is there a dog?", "answer": "Yes", "category": "adversarial",
             "image": {"bytes": base64.b64decode(_b64(1)), "path": None}},
            {"question_id": "1", "question": "Is there a cat?", "answer": "no", "category": "random", "image": {"bytes": base64.b64decode(_b64(2))}}]
    monkeypatch.setattr(data_mod, "read_parquet", lambda path: ((f"{path}:{i}", r) for i, r in enumerate(rows)))
    items, _ = load_items(get_task("pope"), tmp_path, {"pope_splits": ["random", "adversarial"]})
    assert [(it.id, it.target) for it in items] == [("adversarial/1", "yes"), ("random/1", "no")]
    assert data_mod.open_image(items[0].image, items[0].where).size == (40, 48)


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    # pyarrow comes with the lmms extra: its import is made to fail (None in sys.modules)
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)
    (tmp_path / "mme").mkdir()
    (tmp_path / "mme" / "test.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"test\.parquet: reading parquet needs pyarrow"):
        load_items(get_task("mme"), tmp_path)


# ---------------------------------------------------------------------------- bad data


def test_malformed_jsonl_line_names_file_and_line(data):
    path = data / "pope" / "coco_pope_popular.json"
    path.write_text(path.read_text().replace('"question_id": 2', '"question_id: 2'))
    with pytest.raises(DataError, match=r"coco_pope_popular\.json:2: malformed JSON line"):
        load_items(get_task("pope"), data)
    items, errors = load_items(get_task("pope"), data, on_error="skip")
    assert len(items) == 5 and len(errors) == 1 and "coco_pope_popular.json:2" in errors[0]


def test_missing_field_names_row(data):
    path = data / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json"
    obj = json.loads(path.read_text())
    del obj["questions"][1]["question"]
    path.write_text(json.dumps(obj))
    with pytest.raises(DataError, match=r"questions\.json:questions\[1\]: missing field 'question'"):
        load_items(get_task("vqav2"), data)


def test_bad_mme_line_and_bad_mmbench_answer(data):
    txt = data / "mme" / "MME_Benchmark_release_version" / "existence" / "000000006040.txt"
    txt.write_text(txt.read_text() + "a line without a tab\n")
    with pytest.raises(DataError, match=r"000000006040\.txt:3: expected '<question>\\t<Yes\|No>'"):
        load_items(get_task("mme"), data)
    rows = mmbench_rows()
    rows[1][7] = "E"
    write_mmbench(data / "mmbench", rows)
    with pytest.raises(DataError, match=r"MMBench_DEV_EN\.tsv:3: answer 'E' is not one of the options"):
        load_items(get_task("mmbench"), data)


def test_missing_files_are_named(tmp_path):
    (tmp_path / "gqa").mkdir()
    with pytest.raises(DataError, match=r"gqa: no GQA questions JSON"):
        load_items(get_task("gqa"), tmp_path)
    (tmp_path / "scienceqa").mkdir()
    with pytest.raises(DataError, match=r"problems\.json: missing"):
        load_items(get_task("sqa"), tmp_path)
    with pytest.raises(DataError, match=r"nowhere: missing"):
        load_items(get_task("pope"), tmp_path / "nowhere")


def test_broken_image_names_file_and_row(data):
    items = load_items(get_task("textvqa"), data)[0]
    (data / "textvqa" / "train_images" / "abc1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"TextVQA_0\.5\.1_val\.json:data\[1\]: image does not open"):
        data_mod.open_image(items[1].image, items[1].where)
    (data / "textvqa" / "train_images" / "abc2.jpg").unlink()
    with pytest.raises(DataError, match=r"data\[2\]: .*abc2\.jpg: missing"):
        data_mod.open_image(items[2].image, items[2].where)
