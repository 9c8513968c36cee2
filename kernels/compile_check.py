"""`python -m vlm_prune.kernels.compile_check`: compiles every Triton kernel to GPU machine code
on a machine without a GPU, in the configurations the launchers use.

The CPU test suite runs the kernels in the Triton interpreter, which executes them as NumPy and
so never meets the compiler: a kernel can pass every interpreted test and still fail to compile,
or ask for more shared memory than a GPU has. This runs Triton's whole NVIDIA pipeline (front
end, LLVM, ptxas -- all shipped in the Triton wheel, no driver needed) per kernel and
architecture, and checks each kernel's shared memory against the architecture's limit per block.
It must run without TRITON_INTERPRET (the kernels have to be real JIT functions): the test runs
it in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import sys

# shared memory one block may use, bytes (CUDA programming guide, compute capabilities)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def configurations() -> list[tuple[str, object, dict, dict, dict]]:
    """(label, kernel, pointer/scalar argument types, constexprs, launch options) per case;
    arguments not named are int32 scalars."""
    import torch
    import triton

    from . import triton_attention as ta
    from . import triton_compaction as tc
    from . import triton_kernels as tk

    cases = []
    for dtype in ("bf16", "fp32"):
        cases.append((f"[CLS] logits {dtype}", tk._cls_logits_kernel,
                      dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", logit_ptr="*fp32", pmax_ptr="*fp32", psum_ptr="*fp32",
                           scale="fp32"), dict(BLOCK_T=64, BLOCK_D=128), {}))
    cases.append(("[CLS] combine", tk._cls_combine_kernel, dict(logit_ptr="*fp32", pmax_ptr="*fp32", psum_ptr="*fp32",
                                                                out_ptr="*fp32"),
                  dict(BLOCK_T=256, BLOCK_H=16, BLOCK_NB=256), dict(num_warps=8)))
    for per_row, block, warps in ((False, 1024, 4), (True, 16384, 16)):
        cases.append((f"top-k slots, {block} tokens", tk._topk_slots_kernel,
                      dict(s_ptr="*fp32", k_ptr="*i32", out_ptr="*i32"), dict(PER_ROW_K=per_row, BLOCK_N=block),
                      dict(num_warps=warps)))
    cases.append(("compact gather", tk._compact_gather_kernel,
                  dict(x_ptr="*bf16", slot_ptr="*i32", idx_ptr="*i64", out_ptr="*bf16"), dict(BLOCK_N=32, BLOCK_D=128), {}))
    cases.append(("TTV change", tk._ttv_change_kernel, dict(in_ptr="*bf16", out_ptr="*bf16", vis_ptr="*i8",
                                                            res_ptr="*fp32", pmax_ptr="*fp32", psum_ptr="*fp32"),
                  dict(SIGNED=True, BLOCK_L=16, BLOCK_D=256), {}))
    cases.append(("TTV weight", tk._ttv_weight_kernel, dict(vis_ptr="*i8", res_ptr="*fp32", pmax_ptr="*fp32",
                                                            psum_ptr="*fp32"), dict(BLOCK_L=1024, BLOCK_NB=256), {}))
    for left, planes, mask in ((True, 0, "*i64"), (False, 3, "*i64"), (True, 1, "*u8")):
        cases.append((f"compaction index, {'left' if left else 'right'} pad, {planes} position planes, mask {mask}",
                       tc._compact_index_kernel,
                       dict(img_ptr="*u8", kv_ptr="*u8", pos_ptr="*i64", mask_ptr=mask, keep_ptr="*u8", idx_ptr="*i64",
                            drop_ptr="*i64", total_ptr="*i64", frow_ptr="*i32", pos_out_ptr="*i64", mask_out_ptr=mask),
                       dict(P=max(planes, 1), HAS_POS=planes > 0, RENUMBER=planes != 3, HAS_MASK=True, WANT_MASK=True,
                            LEFT_PAD=left, BLOCK=1024), {}))
    for table, features in ((True, "*bf16"), (False, "*bf16"), (True, "*fp32")):
        cases.append((f"compaction rows, {'table' if table else 'inputs_embeds'}, features {features}",
                      tc._compact_rows_kernel,
                      dict(idx_ptr="*i64", frow_ptr="*i32", ids_ptr="*i64", text_ptr="*bf16", feat_ptr=features,
                           out_ptr="*bf16"), dict(FROM_TABLE=table, BLOCK_W=16, BLOCK_D=256), {}))
    for dtype, head_dim in (("bf16", 80), ("fp16", 64), ("fp32", 80), ("bf16", 128)):
        chunk_a, chunk_b = ta.head_dim_chunks(head_dim)
        meta = dict(BLOCK_M=64, BLOCK_N=64, DA=chunk_a, DB=max(chunk_b, 16), HAS_B=chunk_b > 0, BLOCK_S=16,
                    IEEE=dtype == "fp32")
        for label, kernel, types in (
                ("row stats", ta._received_row_stats_kernel, dict(rot_ptr=f"*{dtype}", cu_ptr="*i32", lse_ptr="*fp32")),
                ("columns", ta._received_columns_kernel,
                 dict(rot_ptr=f"*{dtype}", cu_ptr="*i32", lse_ptr="*fp32", part_ptr="*fp32"))):
            cases.append((f"attention received {label}, {dtype}, head dim {head_dim}", kernel,
                          dict(types, qk_scale="fp32"), meta,
                          ta.pipeline_options(torch.float32 if dtype == "fp32" else torch.bfloat16)))
        cases.append((f"rotary, {dtype}, head dim {head_dim}", ta._rotate_kernel,
                      dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", cs_ptr="*fp32", sn_ptr="*fp32", out_ptr=f"*{dtype}"),
                      dict(BLOCK_T=32, BLOCK_HALF=max(16, triton.next_power_of_2(head_dim // 2))), {}))
    cases.append(("attention received combine", ta._received_combine_kernel,
                  dict(part_ptr="*fp32", cu_ptr="*i32", out_ptr="*fp32"), dict(UNIT=4, BLOCK=128, BLOCK_H=16, BLOCK_S=16),
                  {}))
    return cases


def _registers(compiled) -> str:
    """", N registers, S bytes spilled" per thread, from cuobjdump (shipped with Triton) when present."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool) or "cubin" not in compiled.asm:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return f", {found[1]} registers, {found[2]} bytes of stack (spills)" if found else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 86], choices=sorted(SHARED_LIMIT),
                        help="compute capabilities to compile for (default: 90 = H100/H200, 86 = RTX 30xx)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check needs the real Triton JIT: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for label, kernel, types, constexprs, options in configurations():
            signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
            try:
                compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=options)
            except Exception as exc:  # report every kernel, not only the first failure
                failures += 1
                print(f"FAIL sm_{arch} {label}: {type(exc).__name__}: {str(exc)[:2000]}")
                continue
            shared = compiled.metadata.shared
            fits = shared <= SHARED_LIMIT[arch]
            failures += not fits
            print(f"{'ok  ' if fits else 'FAIL'} sm_{arch} {label}: {shared / 1024:.1f} KB shared"
                  + ("" if fits else f" > {SHARED_LIMIT[arch] / 1024:.0f} KB limit") + _registers(compiled))
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
