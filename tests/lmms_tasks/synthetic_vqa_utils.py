"""lmms-eval task functions for `vlm_prune_synthetic_vqa.yaml` (the fixture model's synthetic VQA).

Each item is asked exactly as `vlm-prune eval --bench textvqa --prompt-suffix ""` asks it (the
question alone; the model's chat template adds "<s> <image> ... answer :") and scored by the same
function `vlm-prune eval` uses (`vlm_prune.evals.metrics.textvqa_metric`, the official TextVQA
scorer on the stripped prediction), so both harnesses give the same score on the same items.
"""

from __future__ import annotations

import io

from PIL import Image

from vlm_prune.evals.metrics import textvqa_metric


def doc_to_visual(doc: dict) -> list:
    """The item's image (an lmms-lab style {"bytes", "path"} struct, or a PIL image when the
    parquet carries datasets' Image feature), in RGB as `vlm-prune eval` opens it."""
    image = doc["image"]
    if isinstance(image, dict):
        image = Image.open(io.BytesIO(image["bytes"]))
    return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def doc_to_target(doc: dict) -> str:
    return doc["answers"][0]


def process_results(doc: dict, results: list[str]) -> dict:
    """One record per item for `aggregate_accuracy` (the harness strips its predictions too)."""
    return {"accuracy": {"prediction": results[0].strip(), "target": list(doc["answers"])}}


def aggregate_accuracy(records: list[dict]) -> float:
    """`vlm-prune eval`'s TextVQA accuracy (%) over the records."""
    return textvqa_metric(records)["accuracy"]
