"""Counts the host's work in a stretch of code: PyTorch ops, Triton launches and device reads.

A transformers prefill on a GPU is host-bound at these sizes, so what pruning costs there is
mostly the number of things the host asks of the device. These counts are the same on a CPU
(kernels in the Triton interpreter) as on a GPU, so a change's cost can be checked without one,
and a test can pin them.

    with count_host_calls() as calls:
        model(**inputs)
    calls.ops, calls.launches, calls.reads

ops: ATen ops that are not views (each a kernel launch or an allocation on a GPU); launches:
Triton kernel launches (the ops the interpreter runs inside one are not counted); reads: calls
that wait for the device to hand a value to the host (`.item()`, `bool(t)`, `.tolist()`,
`nonzero`, boolean-mask indexing, copies to the CPU). On a CPU every tensor counts as device
memory, so host-side index arithmetic belongs in NumPy or Python lists, as on a GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that make a new view of the same memory: no launch, no allocation on the device
_VIEWS = frozenset({
    "view", "_unsafe_view", "expand", "slice", "select", "unsqueeze", "squeeze", "t", "transpose", "permute",
    "alias", "detach", "as_strided", "split", "split_with_sizes", "unbind", "reshape", "_reshape_alias",
    "lift_fresh", "view_as_real", "view_as_complex", "unfold", "narrow", "diagonal", "movedim",
})
_READS = frozenset({"_local_scalar_dense", "nonzero", "masked_select"})


@dataclass
class HostCalls:
    ops: int = 0
    launches: int = 0
    reads: int = 0
    op_names: dict[str, int] = field(default_factory=dict)  # non-view ops by name


class _OpCounter(TorchDispatchMode):
    def __init__(self, calls: HostCalls, in_launch: list[int]):
        super().__init__()
        self.calls, self.in_launch = calls, in_launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.in_launch[0]:
            name = func.overloadpacket.__name__
            if name not in _VIEWS:
                self.calls.ops += 1
                self.calls.op_names[name] = self.calls.op_names.get(name, 0) + 1
            if name in _READS or _copies_to_host(name, args, kwargs) or _indexes_by_mask(name, args):
                self.calls.reads += 1
        return func(*args, **kwargs)


def _indexes_by_mask(name: str, args) -> bool:
    """Indexing by a boolean mask: its output size is the mask's count, read from the device."""
    if name not in ("index", "index_put", "index_put_") or len(args) < 2 or not isinstance(args[1], (list, tuple)):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])


def _copies_to_host(name: str, args, kwargs) -> bool:
    if name not in ("_to_copy", "copy_") or not args or not isinstance(args[0], torch.Tensor):
        return False
    if name == "copy_":  # copy_(dst, src)
        return args[0].device.type == "cpu" and isinstance(args[1], torch.Tensor) and args[1].device.type != "cpu"
    target = kwargs.get("device")
    return args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


@contextlib.contextmanager
def count_host_calls() -> Iterator[HostCalls]:
    """Counts (see the module docstring) everything run inside the block, on this thread."""
    calls, in_launch = HostCalls(), [0]
    patched = []

    def counting(run):
        def launch(self, *args, **kwargs):
            if in_launch[0]:
                return run(self, *args, **kwargs)
            calls.launches += 1
            in_launch[0] += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                in_launch[0] -= 1
        return launch

    try:
        import triton.runtime.interpreter as interpreter
        import triton.runtime.jit as jit

        from . import launch as launcher

        # the launch entry points of compiled and interpreted kernels, and the cached launches
        # of `launch.launch` that bypass them; restored on exit
        for owner, name in ((jit.JITFunction, "run"), (interpreter.InterpretedFunction, "run"),
                            (launcher, "_launch_cached")):
            patched.append((owner, name, getattr(owner, name)))
            setattr(owner, name, counting(getattr(owner, name)))
    except ImportError:  # no Triton: no launches to count
        pass
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        # on a GPU tensor, tolist dispatches a `_to_copy` to the host (counted as an op and a
        # read above); on a CPU tensor it reads memory without an ATen op: counted as the same
        # op, so that both devices give the same counts
        if not in_launch[0] and self.device.type == "cpu":
            calls.reads += 1
            calls.ops += 1
            calls.op_names["_to_copy"] = calls.op_names.get("_to_copy", 0) + 1
        return tolist(self)

    torch.Tensor.tolist = counted_tolist
    try:
        with _OpCounter(calls, in_launch):
            yield calls
    finally:
        torch.Tensor.tolist = tolist
        for owner, name, original in patched:
            setattr(owner, name, original)
