"""Top-k of each row of scores with raster order kept, and the gather of the kept tokens.

`top_k_selection` / `top_k_in_order` / `select_top_k` dispatch to the Triton kernels (threshold
bisection instead of a sort, writing each kept token's output slot, then a fully parallel
scatter of indices and feature rows) or to the references here.
Ties go to the lower index in both, so results do not depend on the batch composition.
"""

from __future__ import annotations

import torch

from .dispatch import current_backend, fused_or_reference


def top_k_in_order_ref(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [I, N] -> [I, k] int64, the indices of the k highest scores, increasing."""
    n = scores.shape[-1]
    if k >= n:
        return torch.arange(n, device=scores.device).expand(scores.shape[0], n).clone()
    # A stable descending sort breaks ties by index; topk's tie order is unspecified.
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values


class Selection:
    """k tokens of each row of `source` [I, N, D], raster order kept, gathered when first read.

    Made from `index` [I, k] int64 (the reference top-k) or from `slots` [I, N] int32 (the fused
    top-k: each token's output slot 0..k-1, or -1 when dropped). A consumer that copies the kept
    rows anyway -- the prefill compaction -- reads `keep` and `source` instead of `features`:
    one gather (a launch and an [I, k, D] copy) less per prefill.
    """

    def __init__(self, source: torch.Tensor, k: int, *, index: torch.Tensor | None = None,
                 slots: torch.Tensor | None = None, backend: str | None = None):
        if (index is None) == (slots is None):
            raise ValueError("a Selection needs exactly one of index and slots")
        self.source, self.k, self.slots = source, k, slots
        self.backend = backend or current_backend()  # a later read may run outside `use_backend`
        self._index, self._features, self._keep = index, None, None

    @property
    def keep(self) -> torch.Tensor:
        """[I, N] bool: the tokens kept."""
        if self._keep is None:
            if self.slots is not None:
                self._keep = self.slots >= 0
            else:
                rows, n = self.source.shape[:2]
                self._keep = torch.zeros(rows, n, dtype=torch.bool, device=self._index.device).scatter_(
                    1, self._index, True)
        return self._keep

    @property
    def index(self) -> torch.Tensor:
        """[I, k] int64, increasing per row."""
        if self._index is None:
            self._gather()
        return self._index

    @property
    def features(self) -> torch.Tensor:
        """[I, k, D] the kept rows of `source`."""
        if self._features is None:
            self._gather()
        return self._features

    def _gather(self) -> None:
        source = self.source
        if self.slots is None:
            self._features = source.gather(1, self._index.unsqueeze(-1).expand(-1, -1, source.shape[-1]))
            return

        def fused():
            from . import triton_kernels

            return triton_kernels.compact_gather(source, self.slots, self.k)

        def reference():  # slots from a kernel that ran, a gather that failed: a device read is fine
            index = self.keep.nonzero()[:, 1].view(source.shape[0], self.k)
            return source.gather(1, index.unsqueeze(-1).expand(-1, -1, source.shape[-1])), index

        self._features, self._index = fused_or_reference("top_k", self.slots, fused, reference, self.backend)


def top_k_selection(features: torch.Tensor, scores: torch.Tensor, k: int, backend: str | None = None) -> Selection:
    """features [I, N, D], scores [I, N] -> the k highest-scoring tokens of each row (a
    `Selection`: nothing is gathered until read)."""
    def fused():
        from . import triton_kernels

        return Selection(features, k, slots=triton_kernels.topk_slots(scores, k), backend=backend)

    def reference():
        return Selection(features, k, index=top_k_in_order_ref(scores, k), backend=backend)

    if k >= scores.shape[-1]:
        return reference()
    return fused_or_reference("top_k", scores, fused, reference, backend)


def top_k_in_order(scores: torch.Tensor, k: int, backend: str | None = None) -> torch.Tensor:
    """scores [I, N] -> [I, k] int64 (see `top_k_in_order_ref`)."""
    return top_k_selection(scores.new_empty(*scores.shape, 0), scores, k, backend).index


def select_top_k(features: torch.Tensor, scores: torch.Tensor, k: int,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """features [I, N, D], scores [I, N] -> (kept features [I, k, D], indices [I, k])."""
    selection = top_k_selection(features, scores, k, backend)
    return selection.features, selection.index
