"""`python -m vlm_prune.kernels.bench`: each Triton kernel against its reference, on a GPU.

Times (CUDA events, median of --repeats after warm-up) at LLaVA-1.5 (576 tokens), LLaVA-NeXT
(2880) and Qwen2-VL (16384) sizes, then the end-to-end pruning overhead -- scoring plus
compaction as a share of prefill -- for a 7B-shaped LLaVA (CLIP-L/336 tower, Llama at hidden
4096 with a few layers: enough to time the per-layer cost), with backend="triton" and "torch".
Prints a Markdown table; --json writes the numbers.

`--smoke` runs tiny sizes on CPU through the Triton interpreter (set TRITON_INTERPRET=1 before
starting Python) to check the script itself; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

SIZES = {"llava-1.5": 576, "llava-next": 2880, "qwen2-vl": 16384}


def _timer(device: str, repeats: int):
    def measure(fn) -> float:
        for _ in range(2):
            fn()
        samples = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(1000 * (time.perf_counter() - t0))
        return statistics.median(samples)

    return measure


def kernel_rows(device: str, repeats: int, sizes: dict[str, int], dtype: torch.dtype) -> list[dict]:
    from . import cls_attention_scores_ref, top_k_in_order_ref, transition_variation_ref, triton_kernels

    measure = _timer(device, repeats)
    rows = []
    for name, tokens in sizes.items():
        heads, head_dim = (16, 64) if name != "qwen2-vl" else (16, 80)
        q = torch.randn(1, heads, head_dim, device=device, dtype=dtype)
        k = torch.randn(1, heads, tokens + 1, head_dim, device=device, dtype=dtype)
        scores = torch.randn(1, tokens, device=device)
        feats = torch.randn(1, tokens, 4096, device=device, dtype=dtype)
        keep = max(1, tokens // 9)
        ks = torch.tensor([keep])
        t_in = torch.randn(1, tokens + 64, 4096, device=device, dtype=dtype)
        t_out = torch.randn_like(t_in)
        visual = torch.zeros(1, tokens + 64, dtype=torch.bool, device=device)
        visual[:, :tokens] = True

        def topk_ref():
            index = top_k_in_order_ref(scores, keep)
            return feats.gather(1, index[..., None].expand(-1, -1, feats.shape[-1]))

        def topk_fused():
            return triton_kernels.compact_gather(feats, triton_kernels.topk_mask(scores, ks), keep)

        cases = [
            ("[CLS] attention row", lambda: cls_attention_scores_ref(q, k, head_dim**-0.5),
             lambda: triton_kernels.cls_attention_scores(q, k, head_dim**-0.5)),
            (f"top-{keep} + gather (D=4096)", topk_ref, topk_fused),
            ("TTV (D=4096)", lambda: transition_variation_ref(t_in, t_out, visual),
             lambda: triton_kernels.transition_variation(t_in, t_out, visual, "signed")),
        ]
        for op, ref, fused in cases:
            ref_ms, fused_ms = measure(ref), measure(fused)
            rows.append(dict(size=name, tokens=tokens, op=op, reference_ms=ref_ms, triton_ms=fused_ms,
                             speedup=ref_ms / fused_ms))
    return rows


def overhead_rows(device: str, repeats: int, dtype: torch.dtype, smoke: bool) -> list[dict]:
    import vlm_prune
    from vlm_prune import tiny

    sizes = (dict(image_size=336, vision_hidden=64, vision_layers=2, text_hidden=128, text_layers=2) if smoke else
             dict(image_size=336, vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096,
                  text_hidden=4096, text_layers=4, text_heads=32, text_kv_heads=32, text_intermediate=11008))
    model, processor = tiny.llava(dtype=dtype, **sizes)
    model = model.to(device)
    inputs = processor(images=[tiny.random_image(640, 480)], text=["USER: <image>\nDescribe the picture. ASSISTANT:"],
                       return_tensors="pt")
    inputs = {key: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for key, v in inputs.items()}
    measure = _timer(device, repeats)
    rows = []
    for backend in ("torch", "triton"):
        handle = vlm_prune.patch(model, "cls_attention", 64, backend=backend)
        selects = []

        def run():
            with torch.inference_mode():
                model(**inputs, logits_to_keep=1)
            selects.append(handle.timings.get("select_s", 0.0))

        prefill_ms = measure(run)
        select_ms = 1000 * statistics.median(selects)
        rows.append(dict(backend=backend, prefill_ms=prefill_ms, select_ms=select_ms,
                         overhead_pct=100 * select_ms / prefill_ms))
        handle.remove()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU via the Triton interpreter")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 2
        device, dtype, sizes, repeats = "cpu", torch.float32, {"smoke": 63}, 1
    else:
        if not torch.cuda.is_available():
            print("the kernel bench needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
            return 2
        device, dtype, sizes, repeats = "cuda", getattr(torch, args.dtype), SIZES, args.repeats
    kernels = kernel_rows(device, repeats, sizes, dtype)
    overhead = overhead_rows(device, max(3, repeats // 4), dtype, args.smoke)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter)"
    print(f"vlm_prune kernels on {name}, {args.dtype if device == 'cuda' else 'float32'}, median of {repeats}\n")
    print("| size | tokens | op | reference ms | Triton ms | speed-up |\n|---|---|---|---|---|---|")
    for r in kernels:
        print(f"| {r['size']} | {r['tokens']} | {r['op']} | {r['reference_ms']:.3f} | {r['triton_ms']:.3f} | {r['speedup']:.2f}x |")
    print("\n7B-shaped LLaVA (4 decoder layers), cls_attention 576 -> 64:\n")
    print("| backend | prefill ms | scoring + compaction ms | share of prefill |\n|---|---|---|---|")
    for r in overhead:
        print(f"| {r['backend']} | {r['prefill_ms']:.2f} | {r['select_ms']:.3f} | {r['overhead_pct']:.2f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "kernels": kernels, "overhead": overhead}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
