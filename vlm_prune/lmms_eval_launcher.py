"""vlm_prune in lmms-eval: any lmms-eval task on a pruned model.

lmms-eval 0.7 takes models from other packages through the `lmms_eval.models` entry points;
vlm_prune registers there a pruned twin of each lmms-eval model class that loads a transformers
VLM of a family vlm_prune supports: `vlm_prune_<name>` for `<name>` in WRAPPED (llava_hf,
qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5, huggingface). A twin is the lmms-eval class itself (a
subclass: loading, prompts, generation and scoring unchanged) that reads one more model argument,
`prune`, and patches the model it loaded with `vlm_prune.patch` -- that instance only:

    lmms-eval --model vlm_prune_llava_hf --tasks pope \\
              --model_args pretrained=./llava-1.5-7b-hf,device_map=cuda,prune=cls_attention:64

`prune`: a configuration string as `vlm-prune eval --compare` reads it ("cls_attention:64",
"fastv:64:layer=2", "visionzip:192+transition:64"), "none" for the unpruned model, or absent: the
checkpoint's own `vlm_prune` block (docs/loading.md), else unpruned. The launcher
`vlm-prune lmms-eval --prune SPEC -- <lmms-eval arguments>` does the renaming for you.

Stats and timings per prefill (visual tokens in and kept, the prefill's wall time, and
`handle.timings`: vision tower, selection, positions) are taken by forward hooks on the model and
logged through lmms-eval's own throughput log, so their means land in the results JSON under
"throughput" (`avg_vlm_prune_kept`, ...). The launcher also writes every prefill's record beside
each results file (`<date>_vlm_prune.json` next to `<date>_results.json`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

PREFIX = "vlm_prune_"
# lmms-eval model ids whose classes load a transformers model of a family vlm_prune supports
# (llava_hf: llava and llava_next checkpoints; huggingface: any AutoModelForImageTextToText). Not
# here: lmms-eval's `llava_onevision` / `llava` (the LLaVA-NeXT repository's own model code, not
# transformers) -- and llava_hf on a llava_onevision checkpoint fails at load with vlm_prune's
# "unsupported model" error.
WRAPPED = ("llava_hf", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "huggingface")
_INSTALL = "lmms-eval is not installed in this environment: pip install 'vlm-prune[lmms]'"
# the summary keys logged into lmms-eval's results ("throughput" -> "avg_vlm_prune_<key>")
_LOGGED = ("visual_tokens", "kept", "prefill_s", "vision_s", "select_s", "positions_s", "failed_prefills")

_loaded: list["PruneRecorder"] = []  # every pruned lmms-eval model made in this process, in order


# ---------------------------------------------------------------------------------- the spec


def parse_prune(value: Any) -> str | None:
    """A `prune` value -> the configuration string to patch with, or None (unpruned).

    "none" -> None; "method:keep[:name=value...][+...]" is validated as `vlm_prune.patch` would
    (ValueError / TypeError naming what is wrong: an unknown method, a missing keep)."""
    from .pipeline_config import pipeline_config

    if value is None or str(value).strip().lower() == "none":
        return None
    if not isinstance(value, str):
        raise ValueError(f"prune={value!r}: give a configuration string such as 'cls_attention:64' or 'none'")
    pipeline_config(value)  # a one-stage string too: "cls_attention:64"
    return value


def prune_argument(text: str) -> str:
    """argparse type of `--prune` (bad values exit 2 with the message)."""
    try:
        parse_prune(text)
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


# ------------------------------------------------------------------------------ the recorder


class PruneRecorder:
    """Patches one loaded transformers model and records each prefill with forward hooks: from the
    vision tower's call (transformers' generate may run it before the first forward) to the end
    of the model forward that follows -- generation's first step, or a loglikelihood forward.

    records: per prefill, {"rows", "visual_tokens", "kept" (summed over the rows), "prefill_s",
    and, when pruned, the handle's timings "vision_s", "select_s", "positions_s"}. `started`
    counts vision calls: more than the records means a forward raised (lmms-eval's llava_hf logs
    the error and scores the item as an empty answer)."""

    def __init__(self, model: Any, prune: Any, source: str):
        import vlm_prune

        self.model, self.source = model, source
        self.records: list[dict[str, Any]] = []
        self.started = 0
        self.spec = parse_prune(prune) if prune is not None else None
        block = getattr(model.config, "vlm_prune", None)
        if self.spec is not None:
            self.handle = vlm_prune.patch(model, self.spec)
        elif prune is None and isinstance(block, dict):  # the checkpoint's own block
            self.handle = vlm_prune.patch(model, **block)
        else:
            self.handle = None
        self.config = self.spec or (block if self.handle is not None else "none")  # what was applied
        cfg = model.config
        self._token_ids = {getattr(cfg, name, None) for name in ("image_token_id", "image_token_index",
                                                                 "video_token_id")} - {None}
        self._t0: float | None = None
        inner = getattr(model, "model", model)
        vision = getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)
        if vision is None:
            raise ValueError(f"{type(model).__name__}: no vision tower found to time the prefill on")
        # always_call: a forward that raises reaches the hook with output None
        self._hooks = [vision.register_forward_pre_hook(self._begin),
                       vision.register_forward_hook(self._vision_end, always_call=True),
                       model.register_forward_hook(self._end, with_kwargs=True, always_call=True)]

    def _sync(self) -> None:
        import torch

        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _begin(self, *_) -> None:
        if self._t0 is None:  # the first vision call of a prefill (LLaVA-NeXT / video may call again)
            self.started += 1
            self._sync()
            self._t0 = time.perf_counter()

    def _vision_end(self, _module, _args, output) -> None:
        if output is None:  # the tower raised (generate may call it before the first forward)
            self._t0 = None

    def _end(self, _module, _args, kwargs, output) -> None:
        if self._t0 is None:  # a decoding step
            return
        if output is None:  # the forward raised: counted in failed_prefills, not recorded
            self._t0 = None
            return
        self._sync()
        record: dict[str, Any] = {"prefill_s": time.perf_counter() - self._t0}
        self._t0 = None
        ids = kwargs.get("input_ids")
        rows = int(ids.shape[0]) if ids is not None else 1
        if self.handle is not None and self.handle.stats:
            stats = self.handle.stats
            visual = sum(s.get("visual_tokens", 0) + s.get("video_tokens", 0) for s in stats)
            kept = sum(s.get("kept", 0) + s.get("video_kept", 0) for s in stats)
            record.update(self.handle.timings)
        else:
            visual = kept = sum(int((ids == t).sum()) for t in self._token_ids) if ids is not None else 0
        self.records.append({"rows": rows, "visual_tokens": visual, "kept": kept, **record})

    def summary(self, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Means: visual tokens and kept per row; seconds per prefill."""
        records = self.records if records is None else records
        rows = sum(r["rows"] for r in records)
        out: dict[str, Any] = {"prune": self.config, "prefills": len(records), "rows": rows,
                               "failed_prefills": self.started - len(self.records)}
        if rows:
            out["visual_tokens"] = sum(r["visual_tokens"] for r in records) / rows
            out["kept"] = sum(r["kept"] for r in records) / rows
        for key in ("prefill_s", "vision_s", "select_s", "positions_s"):
            values = [r[key] for r in records if key in r]
            if values:
                out[key] = sum(values) / len(values)
        return out

    def log_to_lmms_eval(self, since: int) -> None:
        """The means of the records since `since` into lmms-eval's throughput log (results JSON:
        "throughput" -> "avg_vlm_prune_<name>"); nothing is added to its token or time totals."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        summary = self.summary(self.records[since:])
        numbers = {f"vlm_prune_{k}": summary[k] for k in _LOGGED if k in summary}
        log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=numbers)
        if summary["failed_prefills"]:
            from loguru import logger

            logger.error(f"vlm_prune: {summary['failed_prefills']} forward(s) of the pruned model raised; lmms-eval "
                         "logged the error and scored those items as empty answers")

    def to_json(self) -> dict[str, Any]:
        return {"lmms_eval_model": self.source, "model": type(self.model).__name__,
                "summary": self.summary(), "prefills": self.records}


# ------------------------------------------------------------------ the lmms-eval model classes


class _Pruned:
    """Mixed in before an lmms-eval model class: reads `prune`, patches the loaded model."""

    def __init__(self, *args: Any, prune: Any = None, **kwargs: Any):
        if prune is not None:
            parse_prune(prune)  # a bad spec fails before the weights are read
        super().__init__(*args, **kwargs)
        self.vlm_prune = PruneRecorder(self.model, prune, type(self).lmms_eval_id)
        _loaded.append(self.vlm_prune)

    def generate_until(self, requests):
        since = len(self.vlm_prune.records)
        out = super().generate_until(requests)
        self.vlm_prune.log_to_lmms_eval(since)
        return out

    def loglikelihood(self, requests):
        since = len(self.vlm_prune.records)
        out = super().loglikelihood(requests)
        self.vlm_prune.log_to_lmms_eval(since)
        return out


def _class_name(base: str, kind: str) -> str:
    return f"Pruned__{base}__{kind}"


@functools.cache
def _pruned_class(base: str, kind: str) -> type:
    from lmms_eval.models import get_model

    parent = get_model(base, force_simple=kind == "simple")
    name = _class_name(base, kind)
    return type(name, (_Pruned, parent), {"__module__": __name__, "__qualname__": name,
                                          "lmms_eval_id": PREFIX + base})


def __getattr__(name: str) -> Any:
    """The pruned classes, made on first use (lmms-eval imports them by the paths in manifests())."""
    parts = name.split("__")
    if len(parts) == 3 and parts[0] == "Pruned" and parts[1] in WRAPPED and parts[2] in ("simple", "chat"):
        return _pruned_class(parts[1], parts[2])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def manifests() -> list:
    """The `lmms_eval.models` entry point: one ModelManifest per wrapped model, with a simple
    and / or a chat class as lmms-eval has them (`--force_simple` picks the same one)."""
    from lmms_eval.models import AVAILABLE_CHAT_TEMPLATE_MODELS, AVAILABLE_SIMPLE_MODELS
    from lmms_eval.models.registry_v2 import ModelManifest

    def path(base: str, kind: str, table: dict) -> str | None:
        return f"{__name__}.{_class_name(base, kind)}" if base in table else None

    return [ModelManifest(model_id=PREFIX + base, simple_class_path=path(base, "simple", AVAILABLE_SIMPLE_MODELS),
                          chat_class_path=path(base, "chat", AVAILABLE_CHAT_TEMPLATE_MODELS))
            for base in WRAPPED if base in AVAILABLE_SIMPLE_MODELS or base in AVAILABLE_CHAT_TEMPLATE_MODELS]


# ------------------------------------------------------------------------------ the launcher


def _option(args: list[str], name: str) -> tuple[int, str | None]:
    """(index, value) of `--name VALUE` or `--name=VALUE` in args ((-1, None) if absent)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return i, args[i + 1]
        if arg.startswith(name + "="):
            return i, arg.split("=", 1)[1]
    return -1, None


def _colons(spec: str) -> str:
    """The spec with its option separators ',' written as ':' (the same to the spec's reader),
    except inside brackets: "pool:0.25:mode=subsample,seed=1" -> "pool:0.25:mode=subsample:seed=1"."""
    out, depth = [], 0
    for char in spec:
        depth += (char in "[{(") - (char in "]})")
        out.append(":" if char == "," and depth == 0 else char)
    return "".join(out)


def rewrite_args(args: list[str], prune: str) -> list[str]:
    """lmms-eval arguments with `--model X` -> `--model vlm_prune_X` and `prune=SPEC` added to
    `--model_args`; ValueError for a model vlm_prune does not wrap or a second `prune=`."""
    i, model = _option(args, "--model")
    if model is None:
        raise ValueError(f"give lmms-eval's --model (one of {', '.join(WRAPPED)}) after '--'")
    base = model[len(PREFIX):] if model.startswith(PREFIX) else model
    if base not in WRAPPED:
        raise ValueError(f"lmms-eval model {model!r}: vlm_prune prunes {', '.join(WRAPPED)} (the lmms-eval models "
                         "that load a transformers VLM of a supported family)")
    j, model_args = _option(args, "--model_args")
    if model_args is not None and any(part.strip().startswith("prune=") for part in model_args.split(",")):
        raise ValueError("--model_args already holds prune=; give the pruning once, with --prune")
    prune = _colons(prune)  # a ',' would end lmms-eval's model argument
    model_args = f"{model_args},prune={prune}" if model_args and model_args.strip() else f"prune={prune}"
    drop = {k + step for k in (i, j) if k >= 0 for step in ((0,) if "=" in args[k] else (0, 1))}
    return ["--model", PREFIX + base, "--model_args", model_args, *(a for k, a in enumerate(args) if k not in drop)]


def _register() -> None:
    """Our manifests in lmms-eval's registry when the entry points did not bring them (vlm_prune
    run from a source tree that was never installed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    if PREFIX + WRAPPED[0] not in MODEL_REGISTRY_V2.list_model_names():
        for manifest in manifests():
            MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)


def write_stats(output_path: str | Path, since: float, recorders: list[PruneRecorder]) -> list[Path]:
    """Beside each results file lmms-eval wrote under `output_path` after `since` (epoch s):
    `<date>_vlm_prune.json` with the records of the model that run made (in order)."""
    results = sorted((p for p in Path(output_path).rglob("*_results.json") if p.stat().st_mtime >= since),
                     key=lambda p: p.stat().st_mtime)
    written = []
    for path, recorder in zip(results, recorders):
        target = path.with_name(path.name[: -len("_results.json")] + "_vlm_prune.json")
        target.write_text(json.dumps(recorder.to_json(), indent=2) + "\n")
        written.append(target)
    return written


def run(prune: str, lmms_args: list[str]) -> int:
    """`vlm-prune lmms-eval --prune SPEC -- ARGS`: lmms-eval's own command line on ARGS, with the
    model swapped for its pruned twin; then the stats file beside the results. Exit 0, or 1 when
    lmms-eval wrote no results or a forward of the pruned model raised."""
    args = rewrite_args(lmms_args[1:] if lmms_args[:1] == ["--"] else lmms_args, prune)
    try:
        import lmms_eval  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name != "lmms_eval":
            raise
        raise SystemExit(_INSTALL) from None
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    _register()
    first, start, saved = len(_loaded), time.time() - 1, sys.argv
    sys.argv = ["lmms-eval", *args]
    try:
        lmms_eval_main()
    finally:
        sys.argv = saved
    recorders = _loaded[first:]
    del _loaded[first:]  # the launcher's to report; the models go when lmms-eval lets them go
    for recorder in recorders:
        print(f"vlm_prune ({recorder.source}): " + json.dumps(recorder.summary()))
    _, output_path = _option(args, "--output_path")
    written = write_stats(output_path, start, recorders) if output_path else []
    for path in written:
        print(f"wrote {path}")
    if not recorders or (output_path and not written):
        print("vlm-prune lmms-eval: lmms-eval finished without results (its error is above)", file=sys.stderr)
        return 1
    if any(r.started > len(r.records) for r in recorders):
        print("vlm-prune lmms-eval: a forward of the pruned model raised (logged above); those items scored as "
              "empty answers", file=sys.stderr)
        return 1
    return 0
