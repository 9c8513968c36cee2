"""Mean attention each key receives, over heads and over the query rows of its segment.

The [CLS]-free importance signal for Qwen2-VL / Qwen2.5-VL (VisPruner-style): how much the
vision tower's last block attends to each patch. Computed in chunks of query rows, so no full
T x T map is ever held and the model's own attention can stay on SDPA/flash kernels.
"""

from __future__ import annotations

import torch


def attention_received(
    query: torch.Tensor, keys: torch.Tensor, scale: float, cu_seqlens: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """query, keys: [H, T, Dh] (rotary already applied); cu_seqlens: [S + 1] segment bounds
    (attention is block-diagonal: a token attends within its segment only).

    Returns [T] float32: for each token, softmax(q . K^T * scale) averaged over heads and over
    the query rows of its segment -- the column means of the head-averaged attention map.
    """
    heads, total, _ = query.shape
    received = torch.zeros(total, dtype=torch.float32, device=query.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        k = keys[:, start:end]
        for q_start in range(start, end, chunk):
            q = query[:, q_start : min(q_start + chunk, end)]
            probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)).float() * scale, dim=-1)
            received[start:end] += probs.sum(dim=(0, 1))
        received[start:end] /= heads * (end - start)
    return received
