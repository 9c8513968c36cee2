"""Output and scratch buffers of the fused kernels, all from one function, so the tests can hand
out garbage-filled memory instead (an element a kernel forgets to write then fails the test)."""

from __future__ import annotations

import torch


def empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=device)
