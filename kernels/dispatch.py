"""One dispatch point: which implementation the hot paths use.

backend "auto": the fused Triton kernels on CUDA tensors when Triton is installed, else the
reference PyTorch code; "torch": always the reference; "triton": always the kernels (on CPU
tensors only under TRITON_INTERPRET=1, the Triton interpreter, which the tests use -- it must be
set before the kernel modules are imported). The family patches set the configured backend for
the duration of a prefill with `use_backend`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os

import torch

_backend: contextvars.ContextVar[str] = contextvars.ContextVar("vlm_prune_backend", default="auto")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def use_backend(name: str):
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def use_triton(tensor: torch.Tensor, backend: str | None = None) -> bool:
    """True when `backend` (default: the one set by `use_backend`) routes an op on `tensor`
    to its Triton kernel."""
    backend = backend or _backend.get()
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' but Triton is not installed")
        if tensor.device.type != "cuda" and not interpreting():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)")
        return True
    return tensor.device.type == "cuda" and triton_available()
