"""The fused Triton kernels and their launchers (imported only when Triton is used).

Each launcher has the signature and output of its reference in the module that dispatches to
it; tests compare the two over dtypes, odd sizes and NaN-filled scratch memory. Under
TRITON_INTERPRET=1 they run on CPU tensors (slowly): that is how CI checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# -- [CLS] attention row ----------------------------------------------------------------------


@triton.jit
def _cls_row_kernel(q_ptr, k_ptr, out_ptr, T, D, H, scale,
                    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_ob,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    running_max = -float("inf")
    running_sum = 0.0
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < T
        k = tl.load(k_base + t[:, None] * stride_kt + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        logits = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        logits = tl.where(t_ok, logits, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max), axis=0)
        running_max = new_max
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < T
        k = tl.load(k_base + t[:, None] * stride_kt + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        logits = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        probs = tl.exp(logits - running_max) / running_sum / H
        tl.atomic_add(out_ptr + b * stride_ob + t, probs, mask=t_ok)


def cls_attention_scores(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    batch, heads, length, head_dim = keys.shape
    query = query.contiguous()
    keys = keys.contiguous()
    out = torch.zeros(batch, length, dtype=torch.float32, device=keys.device)
    _cls_row_kernel[(batch, heads)](
        query, keys, out, length, head_dim, heads, float(scale),
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), out.stride(0),
        BLOCK_T=64, BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out


# -- top-k in raster order --------------------------------------------------------------------


@triton.jit
def _topk_mask_kernel(s_ptr, k_ptr, out_ptr, N, stride_s, stride_o,
                      BLOCK_N: tl.constexpr, ITERS: tl.constexpr):
    """Per row: keep the k largest scores, ties to the lower index, by threshold bisection."""
    row = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    x = tl.load(s_ptr + row * stride_s + n, mask=n_ok, other=-float("inf")).to(tl.float32)
    k = tl.load(k_ptr + row)
    lo = tl.min(tl.where(n_ok, x, float("inf")), axis=0)
    hi = tl.max(x, axis=0)
    # invariant: count(x >= lo) >= k and count(x > hi) < k
    for _ in range(ITERS):
        mid = lo + (hi - lo) * 0.5
        above = tl.sum((x >= mid).to(tl.int32), axis=0)
        go_up = above >= k
        lo = tl.where(go_up, mid, lo)
        hi = tl.where(go_up, hi, mid)
    greater = (x > hi) & n_ok
    boundary = (x >= lo) & (x <= hi) & n_ok
    need = k - tl.sum(greater.to(tl.int32), axis=0)
    rank = tl.cumsum(boundary.to(tl.int32), axis=0)
    keep = greater | (boundary & (rank <= need))
    tl.store(out_ptr + row * stride_o + n, keep.to(tl.int8), mask=n_ok)


def topk_mask(scores: torch.Tensor, k: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """scores [R, N], k [R] -> [R, N] bool. `out` ([R, N] int8) may be caller scratch."""
    rows, length = scores.shape
    scores = scores.contiguous()
    out = torch.empty(rows, length, dtype=torch.int8, device=scores.device) if out is None else out
    k = k.to(device=scores.device, dtype=torch.int32).contiguous()
    _topk_mask_kernel[(rows,)](scores, k, out, length, scores.stride(0), out.stride(0),
                               BLOCK_N=triton.next_power_of_2(length), ITERS=48)
    return out.bool()


@triton.jit
def _compact_gather_kernel(x_ptr, mask_ptr, idx_ptr, out_ptr, N, D, stride_xb, stride_xn, stride_mb,
                           stride_ib, stride_ob, stride_on, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row: the kept rows of x, in order, and their indices (one pass over the mask)."""
    b = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    keep = tl.load(mask_ptr + b * stride_mb + n, mask=n_ok, other=0) != 0
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + b * stride_ib + slot, n.to(tl.int64), mask=keep)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        rows = tl.load(x_ptr + b * stride_xb + n[:, None] * stride_xn + d[None, :],
                       mask=keep[:, None] & d_ok[None, :], other=0.0)
        tl.store(out_ptr + b * stride_ob + slot[:, None] * stride_on + d[None, :], rows,
                 mask=keep[:, None] & d_ok[None, :])


def compact_gather(features: torch.Tensor, mask: torch.Tensor, width: int,
                   out: torch.Tensor | None = None, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B, N, D], mask [B, N] with `width` kept per row -> ([B, width, D], [B, width]).
    `out` / `index` may be caller scratch: every slot is written."""
    batch, length, dim = features.shape
    features = features.contiguous()
    mask = mask.to(torch.int8).contiguous()
    if index is None:
        index = torch.empty(batch, width, dtype=torch.int64, device=features.device)
    if out is None:
        out = torch.empty(batch, width, dim, dtype=features.dtype, device=features.device)
    _compact_gather_kernel[(batch,)](features, mask, index, out, length, dim, features.stride(0), features.stride(1),
                                     mask.stride(0), index.stride(0), out.stride(0), out.stride(1),
                                     BLOCK_N=triton.next_power_of_2(length), BLOCK_D=min(64, triton.next_power_of_2(dim)))
    return out, index


# -- token transition variation ------------------------------------------------------------------


@triton.jit
def _ttv_kernel(in_ptr, out_ptr, vis_ptr, res_ptr, L, D, stride_ib, stride_il, stride_ob, stride_ol,
                stride_vb, stride_rb, SIGNED: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row: softmax over visual tokens of (1 - cos) times the norm ratio, in one program."""
    b = tl.program_id(0)
    running_max = -float("inf")
    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        l_ok = l < L
        dot = tl.zeros([BLOCK_L], dtype=tl.float32)
        n_in = tl.zeros([BLOCK_L], dtype=tl.float32)
        n_out = tl.zeros([BLOCK_L], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = l_ok[:, None] & (d < D)[None, :]
            a = tl.load(in_ptr + b * stride_ib + l[:, None] * stride_il + d[None, :], mask=m, other=0.0).to(tl.float32)
            c = tl.load(out_ptr + b * stride_ob + l[:, None] * stride_ol + d[None, :], mask=m, other=0.0).to(tl.float32)
            dot += tl.sum(a * c, axis=1)
            n_in += tl.sum(a * a, axis=1)
            n_out += tl.sum(c * c, axis=1)
        n_in = tl.sqrt(n_in)
        n_out = tl.sqrt(n_out)
        cos = dot / tl.maximum(n_in * n_out, 1e-38)
        if SIGNED:
            change = 1.0 - cos
        else:
            change = 1.0 - tl.abs(cos)
        visual = (tl.load(vis_ptr + b * stride_vb + l, mask=l_ok, other=0) != 0) & l_ok
        running_max = tl.maximum(running_max, tl.max(tl.where(visual, change, -float("inf")), axis=0))
        # stash the change and the ratio: two slots per token of the result row
        tl.store(res_ptr + b * stride_rb + l, change, mask=l_ok)
        tl.store(res_ptr + b * stride_rb + L + l, n_out / tl.maximum(n_in, 1e-38), mask=l_ok)
    total = 0.0
    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        l_ok = l < L
        visual = (tl.load(vis_ptr + b * stride_vb + l, mask=l_ok, other=0) != 0) & l_ok
        change = tl.load(res_ptr + b * stride_rb + l, mask=l_ok, other=0.0)
        total += tl.sum(tl.where(visual, tl.exp(change - running_max), 0.0), axis=0)
    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        l_ok = l < L
        visual = (tl.load(vis_ptr + b * stride_vb + l, mask=l_ok, other=0) != 0) & l_ok
        change = tl.load(res_ptr + b * stride_rb + l, mask=l_ok, other=0.0)
        ratio = tl.load(res_ptr + b * stride_rb + L + l, mask=l_ok, other=0.0)
        weight = tl.where(visual, tl.exp(change - running_max) / total, 0.0)
        tl.store(res_ptr + b * stride_rb + l, weight * ratio, mask=l_ok)


def transition_variation(t_in: torch.Tensor, t_out: torch.Tensor, visual: torch.Tensor, direction: str,
                         scratch: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, D] x2, [B, L] bool -> [B, L] float32. `scratch` ([B, 2L] float32) may be caller memory."""
    batch, length, dim = t_in.shape
    t_in, t_out = t_in.contiguous(), t_out.contiguous()
    visual = visual.to(torch.int8).contiguous()
    result = torch.empty(batch, 2 * length, dtype=torch.float32, device=t_in.device) if scratch is None else scratch
    _ttv_kernel[(batch,)](t_in, t_out, visual, result, length, dim, t_in.stride(0), t_in.stride(1),
                          t_out.stride(0), t_out.stride(1), visual.stride(0), result.stride(0),
                          SIGNED=direction != "abs", BLOCK_L=32, BLOCK_D=min(128, triton.next_power_of_2(dim)))
    out = result[:, :length]
    has_visual = visual.bool().any(1, keepdim=True)
    return torch.where(has_visual, out, torch.zeros_like(out))
