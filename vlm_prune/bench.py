"""`vlm-prune bench`: prefill time of a pruned vs an unpruned model, side by side in one process.

Models have random weights (no download) and real shapes: a ViT-B-size vision tower and an
8-layer Llama/Qwen2 LM at hidden 1024, in the LLaVA-1.5 (576 tokens), LLaVA-NeXT (anyres, 2340
tokens for 640x480), Qwen2-VL (2x2 merge, M-RoPE, 391 tokens for 640x480) or Qwen3-VL video
(an 8-frame 448x448 video, 784 tokens) layout. Timed by
`vlm_prune.benchmark`: one warm-up round, then rounds alternating unpruned and pruned so drift
hits both; medians are reported. Threads are pinned (torch.set_num_threads) for the run.
Clock: by default the process's CPU time (`time.process_time`) on one thread: on a shared
machine other jobs stretch the wall clock of a call (they take the core away) but not the CPU
time it uses, so two back-to-back runs agree (within 1% measured, against 20-30% with the wall
clock on the same loaded machine); `clock="wall"` and more threads are options.

Printed: LLM prefill time (the language model alone, timed by hooks), end-to-end prefill time
(vision tower + scoring + LLM), the measured LLM speed-up beside the theoretical FLOPs ratio,
and the scoring + compaction overhead as a share of the pruned prefill.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import api, tiny
from .benchmark import Variant, describe, measure, pinned_threads, report_table
from .flops import prefill_flops
from .video_inputs import VIDEO_SLOT, qwen_video_inputs

_VIT_B = dict(vision_hidden=768, vision_heads=12, vision_intermediate=3072)
_LLAMA_8L = dict(text_hidden=1024, text_layers=8, text_heads=16, text_kv_heads=16, text_intermediate=2816)

# name -> (builder in vlm_prune.tiny, its sizes, prompt template with {q} for the question)
SHAPES: dict[str, tuple[str, dict[str, Any], str]] = {
    # ViT-B/14 at 336 px (576 tokens) + 8-layer Llama at hidden 1024
    "llava-1.5": ("llava", dict(image_size=336, vision_layers=12, **_VIT_B, **_LLAMA_8L),
                  "USER: <image>\n{q} ASSISTANT:"),
    # the same towers with LLaVA-NeXT anyres: a 640x480 image is 5 crops, 2340 tokens
    "llava-next": ("llava_next", dict(image_size=336, vision_layers=12, **_VIT_B, **_LLAMA_8L),
                   "USER: <image>\n{q} ASSISTANT:"),
    # Qwen2-VL layout (14 px patches, 2x2 merge, M-RoPE): 640x480 -> 34x46 patches -> 391 tokens
    "qwen2-vl": ("qwen2_vl", dict(vision_depth=12, **_VIT_B, **_LLAMA_8L, min_pixels=3136, max_pixels=12845056),
                 "<|vision_start|><|image_pad|><|vision_end|>{q}"),
    # Qwen3-VL layout (16 px patches, 2x2 merge, DeepStack from 3 blocks) with an 8-frame
    # 448x448 video: 4 temporal patches of 14x14 merged tokens, 784 video tokens
    "qwen3-vl-video": ("qwen3_vl", dict(vision_depth=12, deepstack_layers=(3, 7, 11), **_VIT_B, **_LLAMA_8L,
                                        max_pixels=448 * 448),
                       "<|vision_start|><|video_pad|><|vision_end|>{q}"),
    # a quick smoke-test size
    "tiny": ("llava", dict(image_size=336, vision_hidden=64, vision_layers=2, text_hidden=128, text_layers=2),
             "USER: <image>\n{q} ASSISTANT:"),
}


@dataclass
class BenchResult:
    shape: str
    method: str
    keep: int | float | None  # None: a pipeline, whose method string holds each stage's keep
    threads: int
    repeats: int
    visual_tokens: int
    kept_tokens: int
    llm_tokens_unpruned: int
    llm_tokens_pruned: int
    llm_ms_unpruned: float
    llm_ms_pruned: float
    e2e_ms_unpruned: float
    e2e_ms_pruned: float
    select_ms: float
    theoretical_llm_ratio: float
    timings: dict = field(default_factory=dict, repr=False)  # the harness's report: per variant, n, median, spread
    clock: str = "cpu"  # "cpu": the process's CPU time; "wall": the host clock

    @property
    def llm_speedup(self) -> float:
        return self.llm_ms_unpruned / self.llm_ms_pruned

    @property
    def e2e_speedup(self) -> float:
        return self.e2e_ms_unpruned / self.e2e_ms_pruned

    def report(self) -> str:
        share = self.llm_speedup / self.theoretical_llm_ratio
        rows = [
            f"vlm-prune bench | shape {self.shape} | {self.method}"
            f"{'' if self.keep is None else f' keep={self.keep}'} | "
            f"{self.threads} thread(s), {self.clock} clock, median of {self.repeats}",
            f"{'':28}{'unpruned':>12}{'pruned':>12}{'ratio':>9}",
            f"{'visual tokens':28}{self.visual_tokens:>12}{self.kept_tokens:>12}"
            f"{self.visual_tokens / max(self.kept_tokens, 1):>8.2f}x",
            f"{'LLM sequence (last layer)':28}{self.llm_tokens_unpruned:>12}{self.llm_tokens_pruned:>12}"
            f"{self.llm_tokens_unpruned / self.llm_tokens_pruned:>8.2f}x",
            f"{'LLM prefill (ms)':28}{self.llm_ms_unpruned:>12.1f}{self.llm_ms_pruned:>12.1f}"
            f"{self.llm_speedup:>8.2f}x",
            f"{'end-to-end prefill (ms)':28}{self.e2e_ms_unpruned:>12.1f}{self.e2e_ms_pruned:>12.1f}"
            f"{self.e2e_speedup:>8.2f}x",
            f"theoretical LLM FLOPs ratio {self.theoretical_llm_ratio:.2f}x; measured LLM speed-up "
            f"{self.llm_speedup:.2f}x = {100 * share:.1f}% of it",
            f"scoring + compaction: {self.select_ms:.2f} ms = "
            f"{100 * self.select_ms / self.e2e_ms_pruned:.2f}% of pruned end-to-end prefill, "
            f"{100 * self.select_ms / self.llm_ms_pruned:.2f}% of pruned LLM prefill",
        ]
        return "\n".join(rows)

    def spread_report(self) -> str:
        """The harness's table: samples, median, spread per variant and metric."""
        return describe(self.timings["settings"]) + "\n" + report_table(self.timings, baseline="unpruned")

    def to_json(self) -> str:
        data = asdict(self)
        data.update(llm_speedup=self.llm_speedup, e2e_speedup=self.e2e_speedup)
        return json.dumps(data, indent=2)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _LLMTimer:
    """Times the language model's forward with a pre- and a post-hook."""

    def __init__(self, module: torch.nn.Module, clock=time.perf_counter):
        self.clock = clock
        self.elapsed = 0.0
        self.tokens = 0
        self._start = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        self.tokens = (embeds if embeds is not None else ids).shape[1]
        self._start = self.clock()

    def _post(self, module, args, output):
        self.elapsed = self.clock() - self._start

    def close(self):
        for h in self._handles:
            h.remove()


def build_prompt(processor, template: str, text_tokens: int) -> str:
    """The prompt of `template` with a question of about `text_tokens` text tokens."""
    words = "describe the red circle and the blue square at the top left of the picture ".split()
    question = ""
    while len(processor.tokenizer(template.format(q=question))["input_ids"]) - 1 < text_tokens:
        question += words[len(question.split()) % len(words)] + " "
    return template.format(q=question.strip())


VIDEO_FRAMES, VIDEO_SIZE = 8, (448, 448)


def build_inputs(processor, template: str, text_tokens: int):
    """One image (640x480) -- or, for a video template, one 8-frame 448x448 video -- and a
    prompt with about `text_tokens` text tokens."""
    prompt = build_prompt(processor, template, text_tokens)
    if VIDEO_SLOT in template:
        frames = [tiny.random_image(*VIDEO_SIZE, seed=i) for i in range(VIDEO_FRAMES)]
        return qwen_video_inputs(processor, [prompt], [frames])
    return processor(images=[tiny.random_image(640, 480)], text=[prompt], return_tensors="pt")


def run(shape: str = "llava-1.5", method: str = "cls_attention", keep: int | float | None = 64,
        text_tokens: int = 64, repeats: int = 5, threads: int = 1, clock: str = "cpu", **options: Any) -> BenchResult:
    """`clock`: "wall" (time.perf_counter) or "cpu" (time.process_time: the CPU time of this
    process's threads, which other jobs on a shared machine do not add to)."""
    if repeats < 1 or threads < 1:
        raise ValueError(f"repeats={repeats}, threads={threads}: each must be >= 1")
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r}: choose one of {sorted(CLOCKS)}")
    read_clock = CLOCKS[clock]
    with pinned_threads(threads):
        builder, sizes, template = SHAPES[shape]
        model, processor = getattr(tiny, builder)(**sizes)
        inputs = build_inputs(processor, template, text_tokens)
        timer = _LLMTimer(model.model.language_model, read_clock)
        seen: dict[str, Any] = {}  # what the last prefill of each variant saw (tokens, kept, lengths)

        @contextlib.contextmanager
        def patched():
            seen["handle"] = api.patch(model, method, keep, **options)
            try:
                yield
            finally:
                api.unpatch(model)

        def unpruned_extras(_):
            seen["unpruned_tokens"] = timer.tokens
            return {"llm": timer.elapsed}

        def pruned_extras(_):
            handle = seen["handle"]
            seen["kept"] = sum(s["kept"] for s in handle.stats)
            seen["pruned_lengths"] = handle.layer_lengths
            # a pipeline's in-LLM stage reports its own selection time (llm_select_s)
            timings = handle.timings
            return {"llm": timer.elapsed, "select": timings.get("select_s", 0.0) + timings.get("llm_select_s", 0.0)}

        def prefill():
            model(**inputs, logits_to_keep=1)

        try:
            with torch.inference_mode():
                measured = measure([Variant("unpruned", prefill, extras=unpruned_extras),
                                    Variant("pruned", prefill, around=patched, extras=pruned_extras)],
                                   rounds=repeats, warmup_rounds=1, threads=threads, clock=read_clock)
        finally:
            timer.close()
            api.unpatch(model)

    def median(variant: str, metric: str) -> float:
        return measured.ms(variant, metric)

    text_config = model.config.text_config
    placeholders = {model.config.image_token_id, getattr(model.config, "video_token_id", None)} - {None}
    visual = int(sum((inputs["input_ids"] == token).sum() for token in placeholders))
    unpruned_tokens, pruned_lengths = seen["unpruned_tokens"], seen["pruned_lengths"]
    ratio = prefill_flops(text_config, unpruned_tokens).ratio_to(prefill_flops(text_config, pruned_lengths))
    pruned_tokens = pruned_lengths[-1]  # what the last decoder layer saw (in-LLM methods prune inside)
    return BenchResult(
        shape=shape, method=method, keep=keep, threads=threads, repeats=repeats,
        visual_tokens=visual, kept_tokens=seen["kept"],
        llm_tokens_unpruned=unpruned_tokens, llm_tokens_pruned=pruned_tokens,
        llm_ms_unpruned=median("unpruned", "llm"), llm_ms_pruned=median("pruned", "llm"),
        e2e_ms_unpruned=median("unpruned", "time"), e2e_ms_pruned=median("pruned", "time"),
        select_ms=median("pruned", "select"), theoretical_llm_ratio=ratio, timings=measured.to_dict(), clock=clock,
    )
