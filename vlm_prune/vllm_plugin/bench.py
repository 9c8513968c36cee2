"""`vlm-prune bench --backend vllm`: a vLLM engine with the plugin against one without, side by
side in one process.

Run it with an interpreter that has vLLM (on the CPU machines `.venv-vllm/bin/python -m
vlm_prune.cli bench --backend vllm ...`). The model is the `vlm-prune bench` one (random weights,
real shapes: ViT-B-size tower, 8-layer LM at hidden 1024, LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL
layout), saved to a temporary folder; both engines are started first and then used in turns
(`vlm_prune.benchmark`: one warm-up round, then interleaved rounds), so drift hits both. Prefix
caching and the multimodal processor cache are off and every request has its own image, so
every request pays its whole prefill (vision tower included).

Measured per engine (medians over the rounds):
- time to first token of one request (max_tokens=1): the prefill, vision tower included, plus
  vLLM's request processing;
- a batch of `batch` requests generating `max_tokens` tokens each: wall time, requests/s and
  generated tokens/s;
- prompt tokens per request (what the KV cache holds for the prompt).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import types
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import tiny
from ..bench import SHAPES, build_prompt
from ..benchmark import Variant, describe, measure, report_table
from .config import plugin_config


@dataclass
class VLLMBenchResult:
    shape: str
    method: str
    keep: int | float
    options: dict
    device: str
    rounds: int
    batch: int
    max_tokens: int
    prompt_tokens_unpruned: int
    prompt_tokens_pruned: int
    ttft_ms_unpruned: float
    ttft_ms_pruned: float
    batch_s_unpruned: float
    batch_s_pruned: float
    timings: dict = field(default_factory=dict, repr=False)  # the harness's report: per variant, n, median, spread

    @property
    def ttft_speedup(self) -> float:
        return self.ttft_ms_unpruned / self.ttft_ms_pruned

    @property
    def throughput_ratio(self) -> float:
        return self.batch_s_unpruned / self.batch_s_pruned

    def report(self) -> str:
        tokens = self.batch * self.max_tokens
        rows = [
            f"vlm-prune bench --backend vllm | shape {self.shape} | {self.method} keep={self.keep} | {self.device}, "
            f"median of {self.rounds}",
            f"{'':34}{'unpruned':>12}{'pruned':>12}{'ratio':>9}",
            f"{'prompt tokens (KV cache)':34}{self.prompt_tokens_unpruned:>12}{self.prompt_tokens_pruned:>12}"
            f"{self.prompt_tokens_unpruned / self.prompt_tokens_pruned:>8.2f}x",
            f"{'time to first token (ms)':34}{self.ttft_ms_unpruned:>12.1f}{self.ttft_ms_pruned:>12.1f}"
            f"{self.ttft_speedup:>8.2f}x",
            f"{f'batch of {self.batch} x {self.max_tokens} tokens (s)':34}{self.batch_s_unpruned:>12.2f}"
            f"{self.batch_s_pruned:>12.2f}{self.throughput_ratio:>8.2f}x",
            f"{'requests/s':34}{self.batch / self.batch_s_unpruned:>12.2f}{self.batch / self.batch_s_pruned:>12.2f}",
            f"{'generated tokens/s':34}{tokens / self.batch_s_unpruned:>12.1f}{tokens / self.batch_s_pruned:>12.1f}",
        ]
        return "\n".join(rows)

    def spread_report(self) -> str:
        """The harness's table: samples, median, spread per engine and measurement."""
        return describe(self.timings["settings"]) + "\n" + report_table(self.timings)

    def to_json(self) -> str:
        data = asdict(self)
        data.update(ttft_speedup=self.ttft_speedup, throughput_ratio=self.throughput_ratio)
        return json.dumps(data, indent=2)


def run(shape: str = "llava-1.5", method: str = "cls_attention", keep: int | float = 64, text_tokens: int = 64,
        rounds: int = 3, batch: int = 4, max_tokens: int = 8, threads: int = 2, **options: Any) -> VLLMBenchResult:
    """Builds the `shape` model, starts an engine with and one without the plugin, and times them
    in turns. A configuration vLLM cannot serve fails here, before anything is built."""
    import torch

    if rounds < 1 or batch < 1 or max_tokens < 1 or threads < 1:
        raise ValueError(f"rounds={rounds}, batch={batch}, max_tokens={max_tokens}, threads={threads}: "
                         "each must be >= 1")
    builder, sizes, template = SHAPES[shape]
    wanted = {"method": method, "keep": keep, **options}
    # the engine's own checks, before anything is built (the tiny builders are named as the plugin's families)
    plugin_config(types.SimpleNamespace(vlm_prune=dict(wanted)), builder)
    cuda = torch.cuda.is_available()
    if not cuda:  # the engines' OpenMP threads, as `vlm-prune bench --threads` pins torch's
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
        torch.set_num_threads(threads)
    from vllm import LLM, SamplingParams

    from .checkpoint import save_for_vllm

    folder = tempfile.mkdtemp(prefix="vlm_prune_vllm_bench_")
    try:
        model, processor = getattr(tiny, builder)(**sizes)
        save_for_vllm(model, processor, folder)
        del model
        prompt = build_prompt(processor, template, text_tokens)
        engine_kw = dict(model=folder, dtype="float32" if not cuda else "bfloat16", seed=0,
                         enable_prefix_caching=False, mm_processor_cache_gb=0,
                         # two engines share the device (on CPU: the share of RAM for the KV cache)
                         gpu_memory_utilization=0.15 if not cuda else 0.4, enforce_eager=not cuda)
        engines = {"unpruned": LLM(**engine_kw), "pruned": LLM(**engine_kw, hf_overrides={"vlm_prune": wanted})}
        seed = iter(range(10**6))

        def requests(n):
            return [{"prompt": prompt, "multi_modal_data": {"image": tiny.random_image(640, 480, seed=next(seed))}}
                    for _ in range(n)]

        first = SamplingParams(temperature=0, max_tokens=1)
        many = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        prompt_tokens = {}
        variants = []
        for name, llm in engines.items():  # per round: unpruned ttft, unpruned batch, pruned ttft, pruned batch
            def one(llm=llm):
                return llm.generate(requests(1), first, use_tqdm=False)

            def whole(llm=llm):
                return llm.generate(requests(batch), many, use_tqdm=False)

            def count(out, name=name):
                prompt_tokens[name] = len(out[0].prompt_token_ids)
                return {}

            variants += [Variant(f"{name} ttft", one, extras=count), Variant(f"{name} batch", whole)]
        # the first round warms up
        measured = measure(variants, rounds=rounds, warmup_rounds=1, threads=None if cuda else threads)
        del engines, variants, llm
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return VLLMBenchResult(
        shape=shape, method=method, keep=keep, options=options,
        device=torch.cuda.get_device_name() if cuda else f"CPU, {threads} thread(s)",
        rounds=rounds, batch=batch, max_tokens=max_tokens,
        prompt_tokens_unpruned=prompt_tokens["unpruned"], prompt_tokens_pruned=prompt_tokens["pruned"],
        ttft_ms_unpruned=measured.ms("unpruned ttft"), ttft_ms_pruned=measured.ms("pruned ttft"),
        batch_s_unpruned=measured.median("unpruned batch"), batch_s_pruned=measured.median("pruned batch"),
        timings=measured.to_dict(),
    )
