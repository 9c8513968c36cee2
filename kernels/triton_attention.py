"""Fused attention received (the kernels behind `attention_received.attention_received_rotary`;
imported only when Triton is used): rotary, q . K^T, the row softmax and the column means in
four launches, with no T x T map in memory and no device read.

`_rotate_kernel`, program (head, token block): Qwen's vision rotary on the query and the keys
(x * cos + rotate_half(x) * sin, in fp32, cast back to the input dtype as the model does), written
once as [2, H, T, Dh], so the quadratic passes below load plain tiles (rotating inside them
re-read four fp32 cos/sin tiles per key tile: 5x the bytes of the keys, and ~40x slower).
`_received_row_stats_kernel`, program (head, query block): each query row's log-sum-exp (base 2)
over its segment's keys, by the online softmax.
`_received_columns_kernel`, program (head, key block): recomputes the logits against every query
of the keys' segment and sums the probabilities exp2(s - lse) down each column.
`_received_combine_kernel`, program (block of merged tokens): mean over heads, over the
segment's query rows and over the merger's unit of `UNIT` consecutive tokens.

Segments (attention is block-diagonal: one per image or frame) come as cu_seqlens; each row
finds its bounds by comparing with all of them, so a block that straddles two segments is
simply masked -- no host copy of the bounds, no launch per segment. tl.dot needs power-of-two
widths, so the head dim is read as two chunks (80 = 64 + 16): nothing is padded beyond 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers
from .grid import cdiv, next_power_of_2
from .launch import launch

LOG2E = 1.4426950408889634


@triton.jit
def _segment_bounds(cu_ptr, n_cu, t, T, BLOCK_S: tl.constexpr):
    """[start, end) of the segment of each token index in t."""
    j = tl.arange(0, BLOCK_S)
    cu = tl.load(cu_ptr + j, mask=j < n_cu, other=T).to(tl.int32)
    lo = tl.max(tl.where(cu[None, :] <= t[:, None], cu[None, :], 0), axis=1)
    hi = tl.min(tl.where(cu[None, :] > t[:, None], cu[None, :], T), axis=1)
    return lo, hi


@triton.jit
def _rotate_kernel(q_ptr, k_ptr, cs_ptr, sn_ptr, out_ptr, T, H, HALF, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_ct, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """out [2, H, T, 2 * HALF] in the input dtype: rotated query (0) and keys (1)."""
    h = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_HALF)
    m = (t < T)[:, None] & (d < HALF)[None, :]
    trig = t[:, None].to(tl.int64) * stride_ct + d[None, :]
    c1 = tl.load(cs_ptr + trig, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cs_ptr + trig + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sn_ptr + trig, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sn_ptr + trig + HALF, mask=m, other=0.0).to(tl.float32)
    dst = out_ptr + (h * T + t[:, None]).to(tl.int64) * (2 * HALF) + d[None, :]
    _rotate_rows(q_ptr + h * stride_qh, t, d, m, stride_qt, c1, c2, s1, s2, dst, HALF)
    _rotate_rows(k_ptr + h * stride_kh, t, d, m, stride_kt, c1, c2, s1, s2, dst + H * T * (2 * HALF), HALF)


@triton.jit
def _rotate_rows(src_ptr, t, d, m, stride_t, c1, c2, s1, s2, dst, HALF):
    row = src_ptr + t[:, None].to(tl.int64) * stride_t
    x1 = tl.load(row + d[None, :], mask=m, other=0.0)
    x2 = tl.load(row + HALF + d[None, :], mask=m, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(dst, (a * c1 - b * s1).to(x1.dtype), mask=m)
    tl.store(dst + HALF, (b * c2 + a * s2).to(x1.dtype), mask=m)


@triton.jit
def _tile(x_ptr, t, t_ok, Dh, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr):
    """Rows t of one head's [T, Dh] rotated matrix as its two chunks [len(t), DA], [len(t), DB]."""
    row = x_ptr + t[:, None].to(tl.int64) * Dh
    da = tl.arange(0, DA)
    a = tl.load(row + da[None, :], mask=t_ok[:, None] & (da < Dh)[None, :], other=0.0)
    b = a
    if HAS_B:
        db = DA + tl.arange(0, DB)
        b = tl.load(row + db[None, :], mask=t_ok[:, None] & (db < Dh)[None, :], other=0.0)
    return a, b


@triton.jit
def _logits2(qa, qb, ka, kb, qk_scale, HAS_B: tl.constexpr, IEEE: tl.constexpr):
    """[M, N] float32: q . k^T * scale * log2(e) (the exponent base 2 uses)."""
    if IEEE:  # float32 inputs: full precision, not tf32
        s = tl.dot(qa, tl.trans(ka), input_precision="ieee")
        if HAS_B:
            s += tl.dot(qb, tl.trans(kb), input_precision="ieee")
    else:
        s = tl.dot(qa, tl.trans(ka))
        if HAS_B:
            s += tl.dot(qb, tl.trans(kb))
    return s * qk_scale


@triton.jit
def _own_block(rot_ptr, cu_ptr, T, H, Dh, n_cu, OWN: tl.constexpr, BLOCK: tl.constexpr, DA: tl.constexpr,
               DB: tl.constexpr, HAS_B: tl.constexpr, BLOCK_S: tl.constexpr):
    """A program's own tokens: queries (OWN=0, the row pass) or keys (OWN=1, the column pass) of
    head program_id(0), block program_id(1). Returns (head, tokens, in range, segment start,
    segment end, their two chunks, the other side's [T, Dh] matrix of this head, and the [start,
    end) of its rows to visit)."""
    h = tl.program_id(0)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = t < T
    lo, hi = _segment_bounds(cu_ptr, n_cu, t, T, BLOCK_S)
    a, b = _tile(rot_ptr + (OWN * H + h).to(tl.int64) * T * Dh, t, ok, Dh, DA, DB, HAS_B)
    other = rot_ptr + ((1 - OWN) * H + h).to(tl.int64) * T * Dh
    return h, t, ok, lo, hi, a, b, other, tl.min(tl.where(ok, lo, T), axis=0), tl.max(tl.where(ok, hi, 0), axis=0)


@triton.jit
def _received_row_stats_kernel(rot_ptr, cu_ptr, lse_ptr, T, H, Dh, n_cu, qk_scale,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                               HAS_B: tl.constexpr, BLOCK_S: tl.constexpr, IEEE: tl.constexpr):
    h, rows, r_ok, lo, hi, qa, qb, k_base, n_start, n_end = _own_block(rot_ptr, cu_ptr, T, H, Dh, n_cu, 0, BLOCK_M,
                                                                       DA, DB, HAS_B, BLOCK_S)
    row_max = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ka, kb = _tile(k_base, cols, cols < T, Dh, DA, DB, HAS_B)
        same = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        s = tl.where(same, _logits2(qa, qb, ka, kb, qk_scale, HAS_B, IEEE), -float("inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        safe = tl.where(new_max == -float("inf"), 0.0, new_max)  # a row none of whose keys is in this tile
        row_sum = row_sum * tl.exp2(row_max - safe) + tl.sum(tl.exp2(s - safe[:, None]), axis=1)
        row_max = new_max
    # rows past T have no keys (sum 0); they are not stored, but keep log2 finite
    tl.store(lse_ptr + h * T + rows, row_max + tl.log2(tl.maximum(row_sum, 1e-30)), mask=r_ok)


@triton.jit
def _received_columns_kernel(rot_ptr, cu_ptr, lse_ptr, part_ptr, T, H, Dh, n_cu, qk_scale,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                             HAS_B: tl.constexpr, BLOCK_S: tl.constexpr, IEEE: tl.constexpr):
    h, cols, c_ok, lo, hi, ka, kb, q_base, m_start, m_end = _own_block(rot_ptr, cu_ptr, T, H, Dh, n_cu, 1, BLOCK_N,
                                                                       DA, DB, HAS_B, BLOCK_S)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        r_ok = rows < T
        qa, qb = _tile(q_base, rows, r_ok, Dh, DA, DB, HAS_B)
        lse = tl.load(lse_ptr + h * T + rows, mask=r_ok, other=float("inf"))
        same = (rows[:, None] >= lo[None, :]) & (rows[:, None] < hi[None, :]) & r_ok[:, None]
        p = tl.exp2(_logits2(qa, qb, ka, kb, qk_scale, HAS_B, IEEE) - lse[:, None])
        acc += tl.sum(tl.where(same, p, 0.0), axis=0)
    tl.store(part_ptr + h * T + cols, acc, mask=c_ok)


@triton.jit
def _received_combine_kernel(part_ptr, cu_ptr, out_ptr, T, H, n_cu, UNIT: tl.constexpr, BLOCK: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr):
    m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_ok = m < T // UNIT
    heads = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for u in tl.static_range(UNIT):
        t = m * UNIT + u
        t_ok = m_ok & (t < T)
        lo, hi = _segment_bounds(cu_ptr, n_cu, t, T, BLOCK_S)
        part = tl.load(part_ptr + heads[:, None] * T + t[None, :], mask=(heads < H)[:, None] & t_ok[None, :],
                       other=0.0)
        acc += tl.sum(part, axis=0) / (H * tl.maximum(hi - lo, 1)).to(tl.float32)
    tl.store(out_ptr + m, acc / UNIT, mask=m_ok)


def pipeline_options(dtype: torch.dtype) -> dict:
    """Launch options of the two quadratic passes (checked with `compile_check`): 16-bit tiles fit
    4 warps without spilling; fp32's full-precision dots spill kilobytes per thread there."""
    return dict(num_warps=8) if dtype == torch.float32 else {}


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """(DA, DB): the power-of-two chunks tl.dot reads a head dim in (DB = 0: one chunk); each at
    least 16, tl.dot's smallest width."""
    first = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - first
    return first, (max(16, next_power_of_2(rest)) if rest > 0 else 0)


def attention_received_rotary(query: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              scale: float, cu_seqlens: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """See `attention_received.attention_received_rotary_ref`: query, keys [T, H, Dh] before
    rotary (last dim contiguous), cos, sin [T, Dh], cu_seqlens [S + 1] -> [T / unit] float32."""
    total, heads, head_dim = query.shape
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head dim, got {head_dim}")
    query = query if query.stride(-1) == 1 else query.contiguous()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    cu_seqlens = cu_seqlens.contiguous()
    device = query.device
    rotated = buffers.empty(2, heads, total, head_dim, dtype=query.dtype, device=device)
    lse, part = (buffers.empty(heads, total, dtype=torch.float32, device=device) for _ in range(2))
    out = buffers.empty(total // unit, dtype=torch.float32, device=device)
    half = head_dim // 2
    launch(_rotate_kernel, (heads, cdiv(total, 32)),
        query, keys, cos, sin, rotated, total, heads, half, query.stride(0), query.stride(1), keys.stride(0),
        keys.stride(1), cos.stride(0), BLOCK_T=32, BLOCK_HALF=max(16, next_power_of_2(half)))
    chunk_a, chunk_b = head_dim_chunks(head_dim)
    block_s = max(16, next_power_of_2(cu_seqlens.numel()))
    block = 64
    common = (total, heads, head_dim, cu_seqlens.numel(), float(scale) * LOG2E)
    meta = dict(BLOCK_M=block, BLOCK_N=block, DA=chunk_a, DB=max(chunk_b, 16), HAS_B=chunk_b > 0,
                BLOCK_S=block_s, IEEE=query.dtype == torch.float32,
                **pipeline_options(query.dtype))
    grid = (heads, cdiv(total, block))
    launch(_received_row_stats_kernel, grid, rotated, cu_seqlens, lse, *common, **meta)
    launch(_received_columns_kernel, grid, rotated, cu_seqlens, lse, part, *common, **meta)
    merged = max(1, total // unit)
    combine = 128
    launch(_received_combine_kernel, (cdiv(merged, combine),),
        part, cu_seqlens, out, total, heads, cu_seqlens.numel(), UNIT=unit, BLOCK=combine,
        BLOCK_H=next_power_of_2(heads), BLOCK_S=block_s)
    return out
