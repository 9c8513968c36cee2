"""Fused attention received (the kernels behind `attention_received.attention_received_rotary`;
imported only when Triton is used): rotary, q . K^T, the row softmax and the column means in
three launches, with no T x T map in memory and no device read.

`_received_row_stats_kernel`, program (head, query block): rotates the query and key tiles
(Qwen's vision rotary: x * cos + rotate_half(x) * sin, in fp32, cast back to the input dtype as
the model does) and keeps each query row's running softmax max and sum over its segment's keys.
`_received_columns_kernel`, program (head, key block): recomputes the logits against every query
of the keys' segment and sums the normalised probabilities down each column.
`_received_combine_kernel`, program (block of merged tokens): mean over heads, over the
segment's query rows and over the merger's unit of `UNIT` consecutive tokens.

Segments (attention is block-diagonal: one per image or frame) come as cu_seqlens; each row
finds its bounds by comparing with all of them, so a block that straddles two segments is
simply masked -- no host copy of the bounds, no launch per segment. The head dim is handled as
two halves (what rotate_half pairs up), each padded to a power of two for tl.dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers


@triton.jit
def _segment_bounds(cu_ptr, n_cu, t, T, BLOCK_S: tl.constexpr):
    """[start, end) of the segment of each token index in t."""
    j = tl.arange(0, BLOCK_S)
    cu = tl.load(cu_ptr + j, mask=j < n_cu, other=T).to(tl.int32)
    lo = tl.max(tl.where(cu[None, :] <= t[:, None], cu[None, :], 0), axis=1)
    hi = tl.min(tl.where(cu[None, :] > t[:, None], cu[None, :], T), axis=1)
    return lo, hi


@triton.jit
def _rotated_halves(x_ptr, cs_ptr, sn_ptr, t, t_ok, h, stride_xt, stride_xh, stride_ct, HALF,
                    BLOCK_HALF: tl.constexpr):
    """Rows t of head h rotated: (first half, second half), each [len(t), BLOCK_HALF], in x's dtype."""
    d = tl.arange(0, BLOCK_HALF)
    m = t_ok[:, None] & (d < HALF)[None, :]
    row = x_ptr + t[:, None].to(tl.int64) * stride_xt + h * stride_xh
    x1 = tl.load(row + d[None, :], mask=m, other=0.0)
    x2 = tl.load(row + HALF + d[None, :], mask=m, other=0.0)
    trig = t[:, None].to(tl.int64) * stride_ct + d[None, :]
    c1 = tl.load(cs_ptr + trig, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cs_ptr + trig + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sn_ptr + trig, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sn_ptr + trig + HALF, mask=m, other=0.0).to(tl.float32)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    return (a * c1 - b * s1).to(x1.dtype), (b * c2 + a * s2).to(x1.dtype)


@triton.jit
def _program_tile(x_ptr, cs_ptr, sn_ptr, cu_ptr, t, h, T, n_cu, stride_xt, stride_xh, stride_ct, HALF,
                  BLOCK_HALF: tl.constexpr, BLOCK_S: tl.constexpr):
    """A program's own tokens t (queries in the row pass, keys in the column pass): (in range,
    segment start, segment end, rotated halves, and the [start, end) of the other side to visit)."""
    ok = t < T
    lo, hi = _segment_bounds(cu_ptr, n_cu, t, T, BLOCK_S)
    x1, x2 = _rotated_halves(x_ptr, cs_ptr, sn_ptr, t, ok, h, stride_xt, stride_xh, stride_ct, HALF, BLOCK_HALF)
    return ok, lo, hi, x1, x2, tl.min(tl.where(ok, lo, T), axis=0), tl.max(tl.where(ok, hi, 0), axis=0)


@triton.jit
def _logits(q1, q2, k1, k2, scale, IEEE: tl.constexpr):
    """[M, N] float32: q . k^T * scale from the rotated halves."""
    if IEEE:  # float32 inputs: full precision, not tf32
        s = tl.dot(q1, tl.trans(k1), input_precision="ieee") + tl.dot(q2, tl.trans(k2), input_precision="ieee")
    else:
        s = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
    return s * scale


@triton.jit
def _received_row_stats_kernel(q_ptr, k_ptr, cs_ptr, sn_ptr, cu_ptr, max_ptr, sum_ptr, T, HALF, n_cu, scale,
                               stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr,
                               BLOCK_S: tl.constexpr, IEEE: tl.constexpr):
    h = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok, lo, hi, q1, q2, k_lo, k_hi = _program_tile(q_ptr, cs_ptr, sn_ptr, cu_ptr, rows, h, T, n_cu, stride_qt,
                                                     stride_qh, stride_ct, HALF, BLOCK_HALF, BLOCK_S)
    row_max = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_ok = cols < k_hi
        k1, k2 = _rotated_halves(k_ptr, cs_ptr, sn_ptr, cols, c_ok, h, stride_kt, stride_kh, stride_ct, HALF,
                                 BLOCK_HALF)
        same = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]) & c_ok[None, :]
        s = tl.where(same, _logits(q1, q2, k1, k2, scale, IEEE), -float("inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        safe = tl.where(new_max == -float("inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
        row_max = new_max
    tl.store(max_ptr + h * T + rows, row_max, mask=r_ok)
    tl.store(sum_ptr + h * T + rows, row_sum, mask=r_ok)


@triton.jit
def _received_columns_kernel(q_ptr, k_ptr, cs_ptr, sn_ptr, cu_ptr, max_ptr, sum_ptr, part_ptr, T, HALF, n_cu,
                             scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr,
                             BLOCK_S: tl.constexpr, IEEE: tl.constexpr):
    h = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok, lo, hi, k1, k2, q_lo, q_hi = _program_tile(k_ptr, cs_ptr, sn_ptr, cu_ptr, cols, h, T, n_cu, stride_kt,
                                                     stride_kh, stride_ct, HALF, BLOCK_HALF, BLOCK_S)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(q_lo, q_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        r_ok = rows < q_hi
        q1, q2 = _rotated_halves(q_ptr, cs_ptr, sn_ptr, rows, r_ok, h, stride_qt, stride_qh, stride_ct, HALF,
                                 BLOCK_HALF)
        row_max = tl.load(max_ptr + h * T + rows, mask=r_ok, other=0.0)
        row_sum = tl.load(sum_ptr + h * T + rows, mask=r_ok, other=1.0)
        same = (rows[:, None] >= lo[None, :]) & (rows[:, None] < hi[None, :]) & r_ok[:, None]
        s = _logits(q1, q2, k1, k2, scale, IEEE)
        p = tl.where(same, tl.exp(s - row_max[:, None]) / row_sum[:, None], 0.0)
        acc += tl.sum(p, axis=0)
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
    """Launch options of the two passes (measured with `compile_check`). Each pipeline stage holds
    a key tile and its four fp32 cos/sin tiles (~64 KB at 64 x 64 in 16-bit, ~96 KB in fp32), so
    the default three stages would need 160-256 KB of shared memory (over the 227 KB of an H100
    in fp32, over the 99 KB of an RTX card in any dtype): two stages in 16-bit, one in fp32. At
    4 warps the tiles spilled registers (up to 728 bytes of stack per thread in bf16); 8 warps
    hold them (bf16: none or 8 bytes)."""
    return dict(num_stages=1 if dtype == torch.float32 else 2, num_warps=8)


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
    row_max, row_sum, part = (buffers.empty(heads, total, dtype=torch.float32, device=device) for _ in range(3))
    out = buffers.empty(total // unit, dtype=torch.float32, device=device)
    half = head_dim // 2
    block_half = max(16, triton.next_power_of_2(half))
    block_s = max(16, triton.next_power_of_2(cu_seqlens.numel()))
    ieee = query.dtype == torch.float32
    block = 64
    common = (total, half, cu_seqlens.numel(), float(scale), query.stride(0), query.stride(1), keys.stride(0),
              keys.stride(1), cos.stride(0))
    meta = dict(BLOCK_M=block, BLOCK_N=block, BLOCK_HALF=block_half, BLOCK_S=block_s, IEEE=ieee,
                **pipeline_options(query.dtype))
    _received_row_stats_kernel[(heads, triton.cdiv(total, block))](
        query, keys, cos, sin, cu_seqlens, row_max, row_sum, *common, **meta)
    _received_columns_kernel[(heads, triton.cdiv(total, block))](
        query, keys, cos, sin, cu_seqlens, row_max, row_sum, part, *common, **meta)
    merged = max(1, total // unit)
    combine = 128
    _received_combine_kernel[(triton.cdiv(merged, combine),)](
        part, cu_seqlens, out, total, heads, cu_seqlens.numel(), UNIT=unit, BLOCK=combine,
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_S=block_s)
    return out
