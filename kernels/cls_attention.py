"""Attention of one query row ([CLS]) to every key, averaged over heads.

Only this row is computed, so the model's own attention can stay on SDPA/flash kernels.
"""

from __future__ import annotations

import torch


def cls_attention_scores(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q . K^T * scale) averaged over heads, like eager attention (softmax in fp32).

    query: [B, H, Dh] the [CLS] query per head; keys: [B, H, T, Dh].
    Returns [B, T] float32: the [CLS] row of the head-averaged attention map.
    """
    logits = torch.einsum("bhd,bhtd->bht", query, keys) * scale
    return torch.softmax(logits, dim=-1, dtype=torch.float32).mean(dim=1)
