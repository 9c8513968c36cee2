"""Attention of one query row ([CLS]) to every key, averaged over heads.

Only this row is computed, so the model's own attention can stay on SDPA/flash kernels.
`cls_attention_scores` dispatches to the fused Triton kernels (`_cls_logits_kernel`: one program
per (image, head, key block) writes the logits and the block's softmax partials;
`_cls_combine_kernel`: one program per (image, key block) normalises and averages the heads) or
to `cls_attention_scores_ref`, the reference and CPU path. The keys are read once, in their
dtype and strides, never upcast or copied.
"""

from __future__ import annotations

import torch

from .dispatch import fused_or_reference


def cls_attention_scores_ref(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q . K^T * scale) averaged over heads, like eager attention (softmax in fp32).

    query: [B, H, Dh] the [CLS] query per head; keys: [B, H, T, Dh].
    Returns [B, T] float32: the [CLS] row of the head-averaged attention map.
    """
    logits = torch.einsum("bhd,bhtd->bht", query.float(), keys.float()) * scale
    return torch.softmax(logits, dim=-1).mean(dim=1)


def cls_attention_scores(query: torch.Tensor, keys: torch.Tensor, scale: float, backend: str | None = None) -> torch.Tensor:
    """[B, H, Dh], [B, H, T, Dh] -> [B, T] float32 (see cls_attention_scores_ref)."""
    def fused():
        from . import triton_kernels

        return triton_kernels.cls_attention_scores(query, keys, scale)

    return fused_or_reference("cls_attention_scores", keys, fused,
                              lambda: cls_attention_scores_ref(query, keys, scale), backend)
