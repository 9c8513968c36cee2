"""Fused prefill compaction (the kernels behind `compaction.compact_prompt`; imported only when
Triton is used): two launches instead of some twenty small PyTorch ops.

`_compact_index_kernel`, one program per row: a prefix scan over the row's columns in chunks,
the running counts carried from chunk to chunk, gives each kept column its output slot. It
writes the keep mask and, per slot, the source column, the tokens dropped before it, its
position ids, its mask value and which visual feature fills it. The visual features are
numbered across the whole batch, so the program first counts the earlier rows' placeholders
(a few integer loads per row: batches are small next to the copy that follows).
`_compact_rows_kernel`, one program per (row, slot block, feature block): copies each slot's
row from the visual features, the embedding table or inputs_embeds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers
from .grid import cdiv, next_power_of_2
from .launch import launch


@triton.jit
def _scan_chunk(img_ptr, kv_ptr, c, L, n_img):
    """Columns c of one row: (in range, placeholder, kept placeholder, kept, placeholder rank).
    `n_img` placeholders of the batch come before this chunk (it indexes the per-placeholder
    keep flags)."""
    ok = c < L
    img = (tl.load(img_ptr + c, mask=ok, other=0) != 0) & ok
    rank = n_img + tl.cumsum(img.to(tl.int32), axis=0) - 1
    kept_img = (tl.load(kv_ptr + rank, mask=img, other=0) != 0) & img
    return ok, img, kept_img, ok & (kept_img | ~img), rank


@triton.jit
def _compact_index_kernel(img_ptr, kv_ptr, pos_ptr, mask_ptr, keep_ptr, idx_ptr, drop_ptr, total_ptr, frow_ptr,
                          pos_out_ptr, mask_out_ptr, B, L, W, stride_ib, stride_pp, stride_pb, stride_mb,
                          P: tl.constexpr, HAS_POS: tl.constexpr, RENUMBER: tl.constexpr, HAS_MASK: tl.constexpr,
                          WANT_MASK: tl.constexpr, LEFT_PAD: tl.constexpr, FEATURE_PER_PLACEHOLDER: tl.constexpr,
                          BLOCK: tl.constexpr):
    b = tl.program_id(0)
    ar = tl.arange(0, BLOCK)
    n_img = 0  # placeholders before the current chunk, batch-wide
    n_feat = 0  # kept placeholders before it: the feature row of the next kept one
    for r in range(0, b):
        for c0 in range(0, L, BLOCK):
            _, img, kept_img, _, _ = _scan_chunk(img_ptr + r * stride_ib, kv_ptr, c0 + ar, L, n_img)
            n_img += tl.sum(img.to(tl.int32), axis=0)
            n_feat += tl.sum(kept_img.to(tl.int32), axis=0)
    kept = 0
    seen = n_img
    for c0 in range(0, L, BLOCK):
        _, img, _, keep, _ = _scan_chunk(img_ptr + b * stride_ib, kv_ptr, c0 + ar, L, seen)
        seen += tl.sum(img.to(tl.int32), axis=0)
        kept += tl.sum(keep.to(tl.int32), axis=0)
    if LEFT_PAD:  # short rows padded on the left: their kept tokens end at the last slot
        shift = W - kept
    else:
        shift = kept * 0
    n_keep = 0
    n_drop = 0
    out_row = b * W
    for c0 in range(0, L, BLOCK):
        c = c0 + ar
        ok, img, kept_img, keep, rank = _scan_chunk(img_ptr + b * stride_ib, kv_ptr, c, L, n_img)
        slot = out_row + shift + n_keep + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        dropped = (n_drop + tl.cumsum((ok & ~keep).to(tl.int32), axis=0)).to(tl.int64)
        if FEATURE_PER_PLACEHOLDER:
            frow = rank
        else:
            frow = n_feat + tl.cumsum(kept_img.to(tl.int32), axis=0) - 1
        tl.store(keep_ptr + b * L + c, keep.to(tl.int8), mask=ok)
        tl.store(idx_ptr + slot, c.to(tl.int64), mask=keep)
        tl.store(drop_ptr + slot, dropped, mask=keep)
        tl.store(frow_ptr + slot, tl.where(kept_img, frow, -1), mask=keep)
        for p in tl.static_range(P):
            if HAS_POS:
                pos = tl.load(pos_ptr + p * stride_pp + b * stride_pb + c, mask=keep, other=0).to(tl.int64)
            else:
                pos = c.to(tl.int64)
            if RENUMBER:
                pos = tl.maximum(pos - dropped, 0)
            tl.store(pos_out_ptr + p * B * W + slot, pos, mask=keep)
        if WANT_MASK:
            if HAS_MASK:
                m = tl.load(mask_ptr + b * stride_mb + c, mask=keep, other=0)
            else:
                m = keep.to(tl.int32)
            tl.store(mask_out_ptr + slot, m, mask=keep)
        n_img += tl.sum(img.to(tl.int32), axis=0)
        n_feat += tl.sum(kept_img.to(tl.int32), axis=0)
        n_keep += tl.sum(keep.to(tl.int32), axis=0)
        n_drop += tl.sum((ok & ~keep).to(tl.int32), axis=0)
    tl.store(total_ptr + b, (L - kept).to(tl.int64))
    # slots of a row that keeps fewer tokens than the longest: padding, on the side asked for
    if LEFT_PAD:
        pad_start = kept * 0
    else:
        pad_start = kept
    for j0 in range(0, W, BLOCK):
        j = j0 + ar
        pad = (j >= pad_start) & (j < pad_start + W - kept)
        zero = tl.zeros([BLOCK], dtype=tl.int64)
        tl.store(idx_ptr + out_row + j, zero - 1, mask=pad)
        tl.store(drop_ptr + out_row + j, zero, mask=pad)
        tl.store(frow_ptr + out_row + j, zero.to(tl.int32) - 1, mask=pad)
        for p in tl.static_range(P):
            tl.store(pos_out_ptr + p * B * W + out_row + j, zero, mask=pad)
        if WANT_MASK:
            tl.store(mask_out_ptr + out_row + j, zero, mask=pad)


@triton.jit
def _compact_rows_kernel(idx_ptr, frow_ptr, ids_ptr, text_ptr, feat_ptr, out_ptr, W, D, pad_id,
                         stride_ids, stride_tb, stride_tn, stride_f, FROM_TABLE: tl.constexpr,
                         BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, slot block, feature block). text_ptr: the embedding table (FROM_TABLE; rows
    picked by token id, re-padded slots get `pad_id`'s row) or inputs_embeds (re-padded slots 0)."""
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    j_ok = j < W
    d_ok = (d < D)[None, :]
    col = tl.load(idx_ptr + b * W + j, mask=j_ok, other=-1)
    frow = tl.load(frow_ptr + b * W + j, mask=j_ok, other=-1)
    is_feat = frow >= 0
    is_text = j_ok & ~is_feat
    if FROM_TABLE:
        token = tl.load(ids_ptr + b * stride_ids + col, mask=is_text & (col >= 0), other=pad_id).to(tl.int64)
        text = tl.load(text_ptr + token[:, None] * stride_tn + d[None, :], mask=is_text[:, None] & d_ok, other=0.0)
    else:
        text = tl.load(text_ptr + b * stride_tb + col[:, None] * stride_tn + d[None, :],
                       mask=(is_text & (col >= 0))[:, None] & d_ok, other=0.0)
    feat = tl.load(feat_ptr + frow.to(tl.int64)[:, None] * stride_f + d[None, :], mask=is_feat[:, None] & d_ok,
                   other=0.0)
    dtype = out_ptr.dtype.element_ty
    rows = tl.where(is_feat[:, None], feat.to(dtype), text.to(dtype))
    tl.store(out_ptr + (b * W + j)[:, None].to(tl.int64) * D + d[None, :], rows, mask=j_ok[:, None] & d_ok)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """Bool tensors as uint8 (same memory), last dim contiguous."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.view(torch.uint8) if x.dtype == torch.bool else x


def compact_prompt(is_image, kept_visual, features, row_lengths, left_padded, *, table, input_ids, inputs_embeds,
                   pad_id, positions, renumber, mask, want_mask, features_per_placeholder):
    """The fused `compaction.compact_prompt_ref` (same arguments; `table` [V, D] embeds
    input_ids). Returns (index, dropped_before, total_dropped, keep, embeds, positions, mask)."""
    batch, length = is_image.shape
    width = max(row_lengths)
    device = is_image.device
    img, kept_flags = _bytes(is_image), _bytes(kept_visual.to(device))
    index = buffers.empty(batch, width, dtype=torch.int64, device=device)
    dropped = buffers.empty(batch, width, dtype=torch.int64, device=device)
    feature_row = buffers.empty(batch, width, dtype=torch.int32, device=device)
    total = buffers.empty(batch, dtype=torch.int64, device=device)
    keep = buffers.empty(batch, length, dtype=torch.uint8, device=device)
    if positions is not None:
        positions = positions if positions.stride(-1) == 1 else positions.contiguous()
        planes = positions.unsqueeze(0) if positions.dim() == 2 else positions.reshape(-1, batch, length)
        pos_out = buffers.empty(*positions.shape[:-1], width, dtype=positions.dtype, device=device)
    else:
        planes = index  # never read
        pos_out = buffers.empty(batch, width, dtype=torch.int64, device=device)
    mask_in = _bytes(mask) if mask is not None else index  # never read without a mask
    mask_out = None
    if want_mask:
        mask_out = buffers.empty(batch, width, dtype=mask.dtype if mask is not None else torch.long, device=device)
    block = min(1024, next_power_of_2(max(length, 16)))
    launch(_compact_index_kernel, (batch,),
        img, kept_flags, planes, mask_in, keep, index, dropped, total, feature_row, pos_out,
        _bytes(mask_out) if mask_out is not None else index, batch, length, width, img.stride(0),
        planes.stride(0) if positions is not None else 0, planes.stride(1) if positions is not None else 0,
        mask_in.stride(0), P=planes.shape[0] if positions is not None else 1, HAS_POS=positions is not None,
        RENUMBER=renumber, HAS_MASK=mask is not None, WANT_MASK=want_mask, LEFT_PAD=left_padded,
        FEATURE_PER_PLACEHOLDER=features_per_placeholder, BLOCK=block)
    text = table if table is not None else inputs_embeds
    text = text if text.stride(-1) == 1 else text.contiguous()
    dim = text.shape[-1]
    embeds = buffers.empty(batch, width, dim, dtype=text.dtype, device=device)
    features = features.to(device)
    features = features if features.stride(-1) == 1 else features.contiguous()
    feature_src = features if features.numel() else embeds  # no row is read when none is kept
    ids = (input_ids if input_ids.stride(-1) == 1 else input_ids.contiguous()) if input_ids is not None else index
    block_w, block_d = 16, min(256, next_power_of_2(dim))
    launch(_compact_rows_kernel, (batch, cdiv(width, block_w), cdiv(dim, block_d)),
        index, feature_row, ids, text, feature_src, embeds, width, dim, pad_id, ids.stride(0),
        text.stride(0) if table is None else 0, text.stride(-2), feature_src.stride(0) if features.numel() else 0,
        FROM_TABLE=table is not None, BLOCK_W=block_w, BLOCK_D=block_d)
    return index, dropped, total, keep.view(torch.bool), embeds, pos_out, mask_out
