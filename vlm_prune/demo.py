"""`vlm-prune demo`: every vision-stage method at two budgets on a small LLaVA-1.5-shaped model.

Until the project's trained fixture model ships, the model has random weights (CLIP 336/14 ->
576 visual tokens, 4-layer Llama), so "agreement" -- how often the pruned model's next token
equals the unpruned model's -- stands in for accuracy. Prefill times are medians over prompts.
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

from . import api, tiny

DEMO_SHAPE = dict(image_size=336, vision_hidden=128, vision_layers=4, vision_heads=4,
                  text_hidden=256, text_layers=4, text_heads=8, text_kv_heads=4)
QUESTIONS = [
    "What colour is the shape at the top left?",
    "How many green triangles are there?",
    "Is there a yellow square?",
    "Describe the picture in one word.",
]
BUDGETS = [0.25, 64]  # 144 and 64 of 576 tokens (25% and 11%)
METHODS = [("cls_attention", {}), ("pool", {}), ("random", {})]


def _prompts(processor, n: int):
    for i in range(n):
        image = tiny.random_image(480 + 16 * i, 360 + 8 * i, seed=i)
        text = f"USER: <image>\n{QUESTIONS[i % len(QUESTIONS)]} ASSISTANT:"
        yield processor(images=[image], text=[text], return_tensors="pt")


def _prefill(model, inputs) -> tuple[int, float]:
    start = time.perf_counter()
    logits = model(**inputs, logits_to_keep=1).logits
    return int(logits[0, -1].argmax()), time.perf_counter() - start


def run(threads: int = 2, prompts: int = 8) -> list[dict]:
    torch.set_num_threads(threads)
    model, processor = tiny.llava(**DEMO_SHAPE)
    inputs = list(_prompts(processor, prompts))
    configs = [(None, None, {})] + [(m, k, o) for m, o in METHODS for k in BUDGETS]
    rows, reference = [], []
    with torch.inference_mode(), tqdm(total=len(configs) * prompts, desc="demo", unit="prefill") as bar:
        for method, keep, options in configs:
            handle = api.patch(model, method, keep, **options) if method else None
            tokens, times, kept, visual = [], [], 0, 0
            for item in inputs:
                token, seconds = _prefill(model, item)
                tokens.append(token)
                times.append(seconds)
                if handle is not None:
                    kept += sum(s["kept"] for s in handle.stats)
                    visual += sum(s["visual_tokens"] for s in handle.stats)
                bar.update()
            api.unpatch(model)
            if method is None:
                reference = tokens
            rows.append(dict(
                method=method or "unpruned",
                keep=keep if keep is not None else "-",
                tokens=round(kept / len(inputs)) if method else 576,
                agreement=sum(a == b for a, b in zip(tokens, reference)) / len(inputs),
                prefill_ms=1000 * statistics.median(times),
            ))
    base = rows[0]["prefill_ms"]
    print(f"\nvlm_prune demo: tiny LLaVA-1.5-shaped model (random weights), {prompts} prompts, {threads} thread(s)")
    print(f"{'method':16}{'keep':>6}{'tokens':>8}{'agreement':>11}{'prefill ms':>12}{'speed-up':>10}")
    for r in rows:
        print(f"{r['method']:16}{r['keep']!s:>6}{r['tokens']:>8}{r['agreement']:>10.0%}"
              f"{r['prefill_ms']:>12.1f}{base / r['prefill_ms']:>9.2f}x")
    print("\nagreement = next token equals the unpruned model's (a fidelity proxy; weights are random).")
    print('Try it on your model:  handle = vlm_prune.patch(model, method="cls_attention", keep=64)')
    return rows
