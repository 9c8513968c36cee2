#!/usr/bin/env python
"""Prefill at batch 1: pruned vs unpruned, compiled (`vlm_prune.compile_language_model`) vs eager.

    .venv/bin/python scripts/bench_compiled.py                        # llava-1.5 shape, cls_attention 64, 2 threads
    .venv/bin/python scripts/bench_compiled.py --shape tiny --repeats 3
    .venv/bin/python scripts/bench_compiled.py --method pool --keep 0.25 --json out.json

The models are `vlm-prune bench`'s random-weight shapes (`vlm_prune.bench.SHAPES`: ViT-B tower,
8-layer LM at hidden 1024; one 640x480 image, ~64 text tokens). Four variants, interleaved
round by round through `vlm_prune.benchmark.measure` (threads pinned, one warm-up round,
medians): the unpruned and the pruned model, each with the language model eager (the default
dynamic cache, as generate()'s prefill) and compiled (the prompt padded to its bucket, the
handle's static cache, as generate()'s prefill under `compile_language_model`). Measured: the
whole prefill forward (vision tower, pruning, language model, LM head on the last token) and the
language model alone (hooks around it: padding, graph and cache bookkeeping included). The
first compiled call of each variant (the compilation of its bucket's graph) is timed apart.
Numbers are printed, not asserted; on a GPU pass `--mode reduce-overhead` (the default there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from typing import Any

import torch

from vlm_prune import api, tiny
from vlm_prune.bench import SHAPES, build_inputs
from vlm_prune.benchmark import Variant, describe, measure, pinned_threads
from vlm_prune.compiled import DEFAULT_BUCKETS, MODES, compile_language_model

VARIANTS = ("unpruned eager", "unpruned compiled", "pruned eager", "pruned compiled")


class _LLMTimer:
    """The language model's forward timed by a pre- and a post-hook (host clock; synchronised
    first on a GPU so the time is the forward's own)."""

    def __init__(self, module: torch.nn.Module):
        self.elapsed, self.tokens, self._start = 0.0, 0, 0.0
        self._sync = torch.cuda.synchronize if next(module.parameters()).is_cuda else (lambda: None)
        self._handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                         module.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        self.tokens = (embeds if embeds is not None else kwargs["input_ids"]).shape[1]
        self._sync()
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self._sync()
        self.elapsed = time.perf_counter() - self._start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _keep(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def run(shape: str, method: str, keep: int | float, buckets: tuple[int, ...], mode: str | None, backend: str,
        text_tokens: int, repeats: int, threads: int, device: str) -> dict[str, Any]:
    with pinned_threads(threads):
        builder, sizes, template = SHAPES[shape]
        model, processor = getattr(tiny, builder)(**sizes)
        model = model.to(device)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in build_inputs(processor, template, text_tokens).items()}
        timer = _LLMTimer(model.model.language_model)
        compiled = compile_language_model(model, buckets=buckets, mode=mode, backend=backend)
        seen: dict[str, Any] = {}

        @contextlib.contextmanager
        def pruned():
            api.patch(model, method, keep)
            try:
                yield
            finally:
                api.unpatch(model)

        def eager():
            with compiled.paused():
                return model(**inputs, logits_to_keep=1)

        def with_graphs():
            return model(**inputs, cache=compiled.static_cache(1), logits_to_keep=1)

        def extras(name):
            def record(out):
                seen[name] = {"tokens": timer.tokens, "bucket": compiled.bucket(timer.tokens)}
                return {"llm": timer.elapsed}
            return record

        def first_call(name, fn, around):  # the compilation of this variant's bucket, and its logits
            with around():
                start = time.perf_counter()
                out = fn()
                seconds = time.perf_counter() - start
                reference = eager() if "compiled" in name else None
            seen[name] = {"tokens": timer.tokens, "bucket": compiled.bucket(timer.tokens)}
            error = None if reference is None else float((out.logits - reference.logits).abs().max())
            return seconds, error

        try:
            with torch.no_grad():
                first = {"unpruned compiled": first_call("unpruned compiled", with_graphs, contextlib.nullcontext),
                         "pruned compiled": first_call("pruned compiled", with_graphs, pruned)}
                arounds = {"unpruned eager": None, "unpruned compiled": None, "pruned eager": pruned,
                           "pruned compiled": pruned}
                fns = {"unpruned eager": eager, "unpruned compiled": with_graphs, "pruned eager": eager,
                       "pruned compiled": with_graphs}
                result = measure([Variant(name, fns[name], around=arounds[name], extras=extras(name))
                                  for name in VARIANTS], rounds=repeats, warmup_rounds=1, threads=threads,
                                 timing="cuda_events" if model.device.type == "cuda" else "host")
        finally:
            timer.close()
            compiled.remove()
    ms = {name: {metric: result.ms(name, metric) for metric in ("time", "llm")} for name in VARIANTS}
    return {
        "shape": shape, "method": method, "keep": keep, "buckets": list(buckets), "mode": compiled.mode,
        "backend": backend, "threads": threads, "repeats": repeats, "device": device,
        "host": platform.processor() or platform.machine(), "torch": torch.__version__,
        "tokens": {name: seen[name] for name in VARIANTS},
        "first_call_s": {name: s for name, (s, _) in first.items()},
        "max_abs_logit_diff_vs_eager": {name: e for name, (_, e) in first.items()},
        "median_ms": ms,
        "harness": describe(result.settings),
        "timings": result.to_dict(),
    }


def report(data: dict[str, Any]) -> str:
    ms = data["median_ms"]
    head = (f"shape {data['shape']}, {data['method']} keep={data['keep']}, batch 1, {data['threads']} thread(s), "
            f"{data['device']}, torch {data['torch']}, torch.compile mode {data['mode']!r} ({data['backend']})")
    lines = [head, data["harness"], ""]
    for name in ("unpruned compiled", "pruned compiled"):
        t = data["tokens"][name]
        lines.append(f"{name}: LM prompt {t['tokens']} tokens -> bucket {t['bucket']}; first call (compiles the "
                     f"bucket's graph) {data['first_call_s'][name]:.1f} s; max |logit - eager| "
                     f"{data['max_abs_logit_diff_vs_eager'][name]:.2e}")
    lines += ["", "| variant | LM tokens | prefill ms (median) | LLM ms (median) |", "|---|---|---|---|"]
    for name in VARIANTS:
        t = data["tokens"][name]
        tokens = f"{t['tokens']}" + (f" -> {t['bucket']}" if "compiled" in name else "")
        lines.append(f"| {name} | {tokens} | {ms[name]['time']:.1f} | {ms[name]['llm']:.1f} |")
    lines += ["", "| speed-up (median / median) | prefill | LLM |", "|---|---|---|"]
    for label, a, b in (("pruning, eager", "unpruned eager", "pruned eager"),
                        ("pruning, compiled", "unpruned compiled", "pruned compiled"),
                        ("compiling, unpruned", "unpruned eager", "unpruned compiled"),
                        ("compiling, pruned", "pruned eager", "pruned compiled"),
                        ("both (unpruned eager -> pruned compiled)", "unpruned eager", "pruned compiled")):
        lines.append(f"| {label} | {ms[a]['time'] / ms[b]['time']:.2f}x | {ms[a]['llm'] / ms[b]['llm']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llava-1.5", choices=[s for s in SHAPES if "video" not in s])
    parser.add_argument("--method", default="cls_attention")
    parser.add_argument("--keep", default="64", type=_keep)
    parser.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKETS)),
                        type=lambda text: tuple(int(b) for b in text.split(",")))
    parser.add_argument("--mode", default=None, choices=MODES, help="default: reduce-overhead on CUDA, else default")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--text-tokens", default=64, type=int)
    parser.add_argument("--repeats", default=5, type=int)
    parser.add_argument("--threads", default=2, type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    data = run(args.shape, args.method, args.keep, args.buckets, args.mode, args.backend, args.text_tokens,
               args.repeats, args.threads, args.device)
    print(report(data))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
