"""Top-k of each row of scores with raster order kept, and the gather of the kept tokens.

`top_k_in_order` / `select_top_k` dispatch to the Triton kernels (threshold bisection instead of
a sort, writing each kept token's output slot, then a fully parallel scatter of indices and
feature rows) or to the references here.
Ties go to the lower index in both, so results do not depend on the batch composition.
"""

from __future__ import annotations

import torch

from .dispatch import fused_or_reference


def top_k_in_order_ref(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [I, N] -> [I, k] int64, the indices of the k highest scores, increasing."""
    n = scores.shape[-1]
    if k >= n:
        return torch.arange(n, device=scores.device).expand(scores.shape[0], n).clone()
    # A stable descending sort breaks ties by index; topk's tie order is unspecified.
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values


def _fused_top_k(features: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    from . import triton_kernels

    return triton_kernels.compact_gather(features, triton_kernels.topk_slots(scores, k), k)


def top_k_in_order(scores: torch.Tensor, k: int, backend: str | None = None) -> torch.Tensor:
    if k >= scores.shape[-1]:
        return top_k_in_order_ref(scores, k)
    return fused_or_reference(
        "top_k", scores, lambda: _fused_top_k(scores.new_empty(*scores.shape, 0), scores, k)[1],
        lambda: top_k_in_order_ref(scores, k), backend)


def select_top_k(features: torch.Tensor, scores: torch.Tensor, k: int,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """features [I, N, D], scores [I, N] -> (kept features [I, k, D], indices [I, k])."""
    def reference():
        index = top_k_in_order_ref(scores, k)
        return features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1])), index

    if k >= scores.shape[-1]:
        return reference()
    return fused_or_reference("top_k", scores, lambda: _fused_top_k(features, scores, k), reference, backend)
