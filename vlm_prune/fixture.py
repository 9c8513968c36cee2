"""The fixture VLM shipped with vlm_prune: a tiny real `LlavaForConditionalGeneration` that answers
the synthetic VQA benchmark (`vlm_prune.evals.synthetic_vqa`), so pruning methods can be scored by
accuracy on CPU (`vlm-prune demo`, the tests).

    from vlm_prune import fixture
    model, processor = fixture.load()                    # the shipped checkpoint, offline
    items = synthetic_vqa.make_split("test", 600)
    fixture.evaluate(model, processor, items)            # {"accuracy": ..., "per_qtype": {...}}

Model: CLIP vision tower (168 px, patch 14 -> 144 visual tokens, hidden 128, 4 layers, 4 heads,
MLP 512, quick_gelu), gelu projector, Llama (hidden 128, 3 layers, 4 heads, MLP 512, vocab = the
benchmark's WordLevel tokenizer); vision_feature_layer -2, strategy "default" (no [CLS] token).
The model card beside the weights (`vlm_prune/fixture_model/README.md`) holds its data, training
stages, commands, metrics and lineage; the training itself is `tools/train_fixture.py` in the
repository (not installed, never imported by the package).

Command line: ``python -m vlm_prune.fixture eval [--path DIR] [--n N] [--split S]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from vlm_prune.evals import synthetic_vqa as sv

DEFAULT_PATH = Path(__file__).resolve().parent / "fixture_model"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PROCESSOR = ("processor_config.json", "tokenizer.json", "tokenizer_config.json")


def _missing(path: Path) -> list[str]:
    """The files a saved fixture folder needs that `path` lacks (all of them if it is no folder)."""
    weights = [] if any((path / name).is_file() for name in _WEIGHTS) else [_WEIGHTS[0]]
    config = [] if (path / "config.json").is_file() else ["config.json"]
    return config + weights + [name for name in _PROCESSOR if not (path / name).is_file()]


def load(path=None):
    """(model, processor) of the shipped checkpoint (default `vlm_prune/fixture_model/`), eval mode.

    A folder without the checkpoint's files raises FileNotFoundError naming them (never a Hugging
    Face hub lookup: a path that is not a folder would otherwise be taken for a hub id)."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    folder = Path(path) if path is not None else DEFAULT_PATH
    missing = _missing(folder)
    if missing:
        if path is None:
            raise FileNotFoundError(
                f"the fixture model's files are missing from {folder} ({', '.join(missing)}): this installation "
                "of vlm_prune lacks its package data vlm_prune/fixture_model/. Reinstall it from the repository "
                "(`pip install .`, or a wheel built from it: both carry the model), or pass load(path=...) a "
                "folder saved by tools/train_fixture.py."
            )
        raise FileNotFoundError(
            f"no fixture model at {folder} ({', '.join(missing)} missing): pass a folder saved by "
            "tools/train_fixture.py, or nothing for the shipped model"
        )
    model = LlavaForConditionalGeneration.from_pretrained(str(folder)).eval()
    return model, LlavaProcessor.from_pretrained(str(folder))


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, processor, items, batch_size: int = 64, restrict: bool = True) -> dict:
    """Accuracy of `model` on synthetic-VQA `items`, overall and per qtype.

    Each prompt runs through the real processor and `model(...)`; the prediction is the argmax of
    the last-position logits restricted to the benchmark's answer words (`restrict=True`, the
    reported "accuracy") -- `accuracy_argmax` is the plain argmax over the whole vocabulary.
    """
    tok = processor.tokenizer
    answer_ids = torch.tensor(tok.convert_tokens_to_ids(sv.ANSWER_WORDS))
    model.eval()
    correct, correct_any, per = [], [], {}
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        inputs = processor(images=[it.image for it in batch], text=[it.prompt for it in batch],
                           padding=True, return_tensors="pt")
        logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()
        pred_r = answer_ids[logits[:, answer_ids].argmax(-1)]
        pred_a = logits.argmax(-1)
        gold = torch.tensor(tok.convert_tokens_to_ids([it.answer for it in batch]))
        for it, ok, ok_a in zip(batch, (pred_r == gold).tolist(), (pred_a == gold).tolist()):
            correct.append(ok)
            correct_any.append(ok_a)
            per.setdefault(it.qtype, []).append(ok)
    return {
        "correct": correct,  # per item, in order (bootstrap intervals, paired comparisons)
        "accuracy": float(np.mean(correct)),
        "accuracy_argmax": float(np.mean(correct_any)),
        "n": len(items),
        "per_qtype": {q: float(np.mean(v)) for q, v in sorted(per.items())},
        "n_per_qtype": {q: len(v) for q, v in sorted(per.items())},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vlm_prune.fixture")
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="score a saved fixture on the test split")
    e.add_argument("--path", default=None)
    e.add_argument("--n", type=int, default=2400)
    e.add_argument("--split", default="test")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        parser.exit(2, "the fixture's training is not part of the package: run `python tools/train_fixture.py train "
                       "...` (same arguments) in a checkout of the repository\n")
    args = parser.parse_args(argv)
    print_evaluation(args.path, args.split, args.n)


def print_evaluation(path: str | None, split: str, n: int) -> None:
    """Scores the fixture at `path` (None: the shipped one) on n questions of a split; prints JSON."""
    model, processor = load(path)
    res = evaluate(model, processor, sv.make_split(split, n))
    res.pop("correct")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
