"""One dispatch point: which implementation the hot paths use.

backend "auto": the fused Triton kernels on CUDA tensors when Triton is installed, else the
reference PyTorch code; "torch": always the reference; "triton": always the kernels (on CPU
tensors only under TRITON_INTERPRET=1, the Triton interpreter, which the tests use -- it must be
set before the kernel modules are imported). The family patches set the configured backend for
the duration of a prefill with `use_backend`.

Under "auto" a kernel that fails (it cannot compile for this GPU or Triton version, say) warns
once and its reference runs from then on: "auto" never makes a prefill fail that "torch" would
run. "triton" raises instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings
from typing import Callable, TypeVar

import torch

_backend: contextvars.ContextVar[str] = contextvars.ContextVar("vlm_prune_backend", default="auto")
_failed: set[str] = set()  # kernels that failed under "auto": their references run from then on
T = TypeVar("T")


@functools.cache  # find_spec walks sys.path: not on every dispatch
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


def current_backend() -> str:
    """The backend set by the innermost `use_backend` ("auto" outside any)."""
    return _backend.get()


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


def fused_or_reference(name: str, tensor: torch.Tensor, fused: Callable[[], T], reference: Callable[[], T],
                       backend: str | None = None) -> T:
    """`fused()` where the backend routes ops on `tensor` to Triton (see `use_triton`), else
    `reference()`; under "auto" a fused kernel that raises is reported once and replaced by its
    reference for the rest of the process."""
    backend = backend or _backend.get()
    if name in _failed and backend != "triton" or not use_triton(tensor, backend):
        return reference()
    if backend == "triton":
        return fused()
    try:
        return fused()
    except Exception as exc:  # noqa: BLE001 -- any failure: the reference is always correct
        _failed.add(name)
        warnings.warn(f"vlm_prune: the Triton kernel {name!r} failed ({exc!r}); using the PyTorch reference "
                      "from now on (backend='torch' skips the kernels, backend='triton' raises instead)",
                      RuntimeWarning, stacklevel=2)
        return reference()
