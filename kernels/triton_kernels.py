"""The fused Triton kernels and their launchers (imported only when Triton is used).

Each launcher has the signature and output of its reference in the module that dispatches to
it; tests compare the two over dtypes, odd sizes and NaN-filled scratch memory. Under
TRITON_INTERPRET=1 they run on CPU tensors (slowly): that is how CI checks them.

Layout: every kernel spreads over token blocks (or feature blocks), never one program per row,
so a single image still fills the GPU; softmaxes over a whole row use per-block partial
(max, sum-of-exp) pairs combined by a second, tiny launch instead of a grid-wide barrier.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers
from .grid import cdiv, next_power_of_2
from .launch import launch


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with stride 1 and take the other strides as given."""
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def _softmax_stats(pmax_ptr, psum_ptr, NB, BLOCK_NB: tl.constexpr):
    """Row max and sum of exp(x - max) from NB per-block (max, sum) pairs; max 0 for empty rows."""
    j = tl.arange(0, BLOCK_NB)
    j_ok = j < NB
    pmax = tl.load(pmax_ptr + j, mask=j_ok, other=-float("inf"))
    psum = tl.load(psum_ptr + j, mask=j_ok, other=0.0)
    row_max = tl.max(pmax, axis=0)
    row_max = tl.where(row_max == -float("inf"), 0.0, row_max)
    total = tl.sum(tl.where(pmax == -float("inf"), 0.0, psum * tl.exp(pmax - row_max)), axis=0)
    return row_max, total


# -- [CLS] attention row ----------------------------------------------------------------------


@triton.jit
def _cls_logits_kernel(q_ptr, k_ptr, logit_ptr, pmax_ptr, psum_ptr, T, D, H, NB, scale,
                       stride_qb, stride_qh, stride_kb, stride_kh, stride_kt,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b*H + h, block): q . K^T * scale for BLOCK_T keys, and the block's softmax partials."""
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + t[:, None] * stride_kt + d[None, :],
                mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    logits = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
    logits = tl.where(t_ok, logits, -float("inf"))
    tl.store(logit_ptr + bh * T + t, logits, mask=t_ok)
    block_max = tl.max(logits, axis=0)
    tl.store(pmax_ptr + bh * NB + blk, block_max)
    tl.store(psum_ptr + bh * NB + blk, tl.sum(tl.exp(logits - block_max), axis=0))


@triton.jit
def _cls_combine_kernel(logit_ptr, pmax_ptr, psum_ptr, out_ptr, T, H, NB, stride_ob,
                        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_NB: tl.constexpr):
    """Program (b, block): the head-mean of the softmaxed logits for BLOCK_T keys; all heads at
    once as one [BLOCK_H, *] tile (a loop over heads would chain H dependent load rounds)."""
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    h = tl.arange(0, BLOCK_H)
    h_ok = h < H
    j = tl.arange(0, BLOCK_NB)
    part = (b * H + h)[:, None] * NB + j[None, :]
    part_ok = h_ok[:, None] & (j < NB)[None, :]
    pmax = tl.load(pmax_ptr + part, mask=part_ok, other=-float("inf"))
    psum = tl.load(psum_ptr + part, mask=part_ok, other=0.0)
    row_max = tl.max(pmax, axis=1)
    row_max = tl.where(h_ok, row_max, 0.0)
    total = tl.sum(tl.where(part_ok, psum * tl.exp(pmax - row_max[:, None]), 0.0), axis=1)
    total = tl.where(h_ok, total, 1.0)
    logits = tl.load(logit_ptr + (b * H + h)[:, None] * T + t[None, :], mask=h_ok[:, None] & t_ok[None, :],
                     other=-float("inf"))
    probs = tl.exp(logits - row_max[:, None]) / total[:, None]
    tl.store(out_ptr + b * stride_ob + t, tl.sum(probs, axis=0) / H, mask=t_ok)


def cls_attention_scores(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """query [B, H, Dh], keys [B, H, T, Dh] (any strides, last dim contiguous) -> [B, T] float32."""
    batch, heads, length, head_dim = keys.shape
    query, keys = _rows_contiguous(query), _rows_contiguous(keys)
    block_t = 64
    n_blocks = cdiv(length, block_t)
    logits = buffers.empty(batch * heads, length, dtype=torch.float32, device=keys.device)
    pmax = buffers.empty(batch * heads, n_blocks, dtype=torch.float32, device=keys.device)
    psum = buffers.empty(*pmax.shape, dtype=torch.float32, device=pmax.device)
    out = buffers.empty(batch, length, dtype=torch.float32, device=keys.device)
    launch(_cls_logits_kernel, (batch * heads, n_blocks),
        query, keys, logits, pmax, psum, length, head_dim, heads, n_blocks, float(scale),
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        BLOCK_T=block_t, BLOCK_D=next_power_of_2(head_dim),
    )
    block_h, block_nb = next_power_of_2(heads), next_power_of_2(n_blocks)
    combine_t = max(16, min(256, 4096 // block_h))  # a [heads, keys] tile of at most 4096 values
    launch(_cls_combine_kernel, (batch, cdiv(length, combine_t)),
        logits, pmax, psum, out, length, heads, n_blocks, out.stride(0),
        BLOCK_T=combine_t, BLOCK_H=block_h, BLOCK_NB=block_nb, num_warps=4 if block_h * block_nb <= 4096 else 8,
    )
    return out


# -- top-k in raster order --------------------------------------------------------------------


@triton.jit
def _topk_slots_kernel(s_ptr, k_ptr, k_all, out_ptr, N, stride_s, stride_o, PER_ROW_K: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Per row: the output slot of each of the k largest scores (raster order kept, ties to the
    lower index), -1 for the others.

    The k-th largest value is found exactly by bisection over the floats' order-preserving
    integer keys (32 halvings of the int32 range), not by a sort."""
    row = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    x = tl.load(s_ptr + row * stride_s + n, mask=n_ok, other=0.0).to(tl.float32) + 0.0  # -0.0 -> +0.0
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)  # monotone in x
    if PER_ROW_K:
        k = tl.load(k_ptr + row).to(tl.int32)
    else:
        k = k_all
    # invariant: count(key >= lo) >= k > count(key >= hi)
    lo = tl.min(tl.where(n_ok, key, 2**31), axis=0)
    hi = tl.max(tl.where(n_ok, key, -(2**31)), axis=0) + 1
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        above = tl.sum(((key >= mid) & n_ok).to(tl.int32), axis=0)
        go_up = above >= k
        lo = tl.where(go_up, mid, lo)
        hi = tl.where(go_up, hi, mid)
    greater = (key > lo) & n_ok
    boundary = (key == lo) & n_ok
    need = k - tl.sum(greater.to(tl.int32), axis=0)
    keep = greater | (boundary & (tl.cumsum(boundary.to(tl.int32), axis=0) <= need))
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + row * stride_o + n, tl.where(keep, slot, -1), mask=n_ok)


def topk_slots(scores: torch.Tensor, k: int | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """scores [R, N], k (int, or [R] per row) -> [R, N] int32: slot 0..k-1 of each kept token in
    raster order, -1 for the dropped ones (the input of `compact_gather`). `out` ([R, N] int32)
    may be scratch."""
    rows, length = scores.shape
    scores = _rows_contiguous(scores)
    out = buffers.empty(rows, length, dtype=torch.int32, device=scores.device) if out is None else out
    per_row = isinstance(k, torch.Tensor)
    # one k for all rows goes in as a scalar argument: no host-to-device copy per call
    k_rows = k.to(device=scores.device, dtype=torch.int32).contiguous() if per_row else scores
    block = next_power_of_2(length)
    launch(_topk_slots_kernel, (rows,), scores, k_rows, 0 if per_row else int(k), out, length, scores.stride(0),
           out.stride(0), PER_ROW_K=per_row, BLOCK_N=block,
           num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    return out


def slots_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[R, N] bool -> [R, N] int32 slots (see `topk_slots`) for a keep mask from elsewhere."""
    return torch.where(mask, mask.to(torch.int32).cumsum(1) - 1, -1).to(torch.int32)


@triton.jit
def _compact_gather_kernel(x_ptr, slot_ptr, idx_ptr, out_ptr, N, D, stride_xb, stride_xn, stride_sb,
                           stride_ib, stride_ob, stride_on, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, token block, feature block): scatters the kept rows of the block to their
    slots; the first feature block also writes the kept indices."""
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = n < N
    slot = tl.load(slot_ptr + b * stride_sb + n, mask=n_ok, other=-1)
    keep = (slot >= 0) & n_ok
    tl.store(idx_ptr + b * stride_ib + slot, n.to(tl.int64), mask=keep & (n * 0 + tl.program_id(2) == 0))
    both = keep[:, None] & (d < D)[None, :]
    rows = tl.load(x_ptr + b * stride_xb + n[:, None] * stride_xn + d[None, :], mask=both, other=0.0)
    tl.store(out_ptr + b * stride_ob + slot[:, None] * stride_on + d[None, :], rows, mask=both)


def compact_gather(features: torch.Tensor, slots: torch.Tensor, width: int,
                   out: torch.Tensor | None = None, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B, N, D], slots [B, N] int32 (`topk_slots`; slots 0..width-1 each used once per
    row) -> ([B, width, D], [B, width] int64 indices). `out` / `index` may be caller scratch:
    every slot is written."""
    batch, length, dim = features.shape
    features = _rows_contiguous(features)
    slots = slots.to(torch.int32).contiguous()
    if index is None:
        index = buffers.empty(batch, width, dtype=torch.int64, device=features.device)
    if out is None:
        out = buffers.empty(batch, width, dim, dtype=features.dtype, device=features.device)
    block_n, block_d = 32, min(128, next_power_of_2(max(dim, 1)))
    # dim 0 (indices only, `top_k_in_order`): one feature block still writes the indices
    grid = (batch, cdiv(length, block_n), max(1, cdiv(dim, block_d)))
    launch(_compact_gather_kernel, grid, features, slots, index, out, length, dim, features.stride(0),
           features.stride(1), slots.stride(0), index.stride(0), out.stride(0), out.stride(1),
           BLOCK_N=block_n, BLOCK_D=block_d)
    return out, index


# -- token transition variation ------------------------------------------------------------------


@triton.jit
def _ttv_change_kernel(in_ptr, out_ptr, vis_ptr, res_ptr, pmax_ptr, psum_ptr, L, D, NB,
                       stride_ib, stride_il, stride_ob, stride_ol, stride_vb, stride_rb,
                       SIGNED: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, block): direction change and norm ratio of BLOCK_L tokens, stashed in the
    result row ([change | ratio]), and the block's softmax partials over its visual tokens."""
    b = tl.program_id(0)
    blk = tl.program_id(1)
    l = blk * BLOCK_L + tl.arange(0, BLOCK_L)
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
    cos = dot / tl.maximum(n_in * n_out, 1.1754943508222875e-38)
    if SIGNED:
        change = 1.0 - cos
    else:
        change = 1.0 - tl.abs(cos)
    visual = (tl.load(vis_ptr + b * stride_vb + l, mask=l_ok, other=0) != 0) & l_ok
    tl.store(res_ptr + b * stride_rb + l, change, mask=l_ok)
    tl.store(res_ptr + b * stride_rb + L + l, n_out / tl.maximum(n_in, 1.1754943508222875e-38), mask=l_ok)
    masked = tl.where(visual, change, -float("inf"))
    block_max = tl.max(masked, axis=0)
    safe_max = tl.where(block_max == -float("inf"), 0.0, block_max)
    tl.store(pmax_ptr + b * NB + blk, block_max)
    tl.store(psum_ptr + b * NB + blk, tl.sum(tl.where(visual, tl.exp(change - safe_max), 0.0), axis=0))


@triton.jit
def _ttv_weight_kernel(vis_ptr, res_ptr, pmax_ptr, psum_ptr, L, NB, stride_vb, stride_rb,
                       BLOCK_L: tl.constexpr, BLOCK_NB: tl.constexpr):
    """Program (b, block): softmax weight of each visual token times its norm ratio (0 elsewhere)."""
    b = tl.program_id(0)
    l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = l < L
    row_max, total = _softmax_stats(pmax_ptr + b * NB, psum_ptr + b * NB, NB, BLOCK_NB)
    visual = (tl.load(vis_ptr + b * stride_vb + l, mask=l_ok, other=0) != 0) & l_ok
    change = tl.load(res_ptr + b * stride_rb + l, mask=l_ok, other=0.0)
    ratio = tl.load(res_ptr + b * stride_rb + L + l, mask=l_ok, other=0.0)
    weight = tl.where(visual, tl.exp(change - row_max) / total, 0.0)
    tl.store(res_ptr + b * stride_rb + l, weight * ratio, mask=l_ok)


def transition_variation(t_in: torch.Tensor, t_out: torch.Tensor, visual: torch.Tensor, direction: str,
                         scratch: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, D] x2, [B, L] bool -> [B, L] float32. `scratch` ([B, 2L] float32) may be caller memory."""
    batch, length, dim = t_in.shape
    t_in, t_out = _rows_contiguous(t_in), _rows_contiguous(t_out)
    visual = visual.to(torch.int8).contiguous()
    result = buffers.empty(batch, 2 * length, dtype=torch.float32, device=t_in.device) if scratch is None else scratch
    block_l = 16
    n_blocks = cdiv(length, block_l)
    pmax = buffers.empty(batch, n_blocks, dtype=torch.float32, device=t_in.device)
    psum = buffers.empty(*pmax.shape, dtype=torch.float32, device=pmax.device)
    launch(_ttv_change_kernel, (batch, n_blocks),
        t_in, t_out, visual, result, pmax, psum, length, dim, n_blocks, t_in.stride(0), t_in.stride(1),
        t_out.stride(0), t_out.stride(1), visual.stride(0), result.stride(0),
        SIGNED=direction != "abs", BLOCK_L=block_l, BLOCK_D=min(256, next_power_of_2(dim)))
    weight_l = 1024
    launch(_ttv_weight_kernel, (batch, cdiv(length, weight_l)),
        visual, result, pmax, psum, length, n_blocks, visual.stride(0), result.stride(0),
        BLOCK_L=weight_l, BLOCK_NB=next_power_of_2(n_blocks))
    return result[:, :length]
