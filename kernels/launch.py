"""Kernel launches without Triton's per-call host work.

`kernel[grid](*args, **kw)` runs `JITFunction.run` on every call: it binds and specialises every
argument, builds a cache key from the string of the options, reads knobs, and (Triton 3.6) hands
the compiled launcher launch metadata and two empty hook chains, which it calls. A pruned prefill
makes 5-8 launches between the vision tower and the language model; on an H200's host, skipping
that work took 0.10-0.15 ms off the ~1.1-1.4 ms the pruning of a LLaVA-7B prefill spends on the
host (`benchmarks/results/kernels/NOTES.md`, runs 10-11).

`launch(kernel, grid, *args, **kw)` launches the same compiled kernel: the first call of each
argument signature goes through Triton (compiling it if needed), later ones call the compiled
kernel's launcher directly. The signature is finer than Triton's specialisation (each tensor's
dtype and 16-byte alignment; each int's ==1, %16 and 32/64-bit range; every constexpr and launch
option by value), so a cached kernel only ever serves arguments Triton would have compiled it
for. Triton's own path runs instead under the interpreter, with launch hooks set (profilers), or
on a Triton whose internals this module does not know (one check, at first use).
Changing TRITON_DEBUG after a kernel's first launch is not seen.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

_cache: dict[tuple, tuple[Any, tuple[str, ...], tuple[Any, ...]]] = {}
_constexprs: dict[int, frozenset[int]] = {}  # id(kernel) -> positions of its constexpr parameters
_state: dict[str, Any] = {}  # "fast": bool, decided at first use; Triton's driver functions and knobs


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)` (grid a tuple of 1-3 ints)."""
    fast = _state.get("fast")
    if fast is None:
        fast = _init()
    if not fast or _hooks_set():
        kernel[grid](*args, **kwargs)
        return
    device = _state["device"]()
    key = (id(kernel), device, _signature(kernel, args, kwargs))  # kernels are module globals: ids stay theirs
    entry = _cache.get(key)
    if entry is None:
        compiled = kernel.run(*args, grid=grid, warmup=False, **kwargs)  # Triton's path: binds, compiles, launches
        if all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            _cache[key] = (compiled, *_plan(kernel, len(args), kwargs))
        return
    _launch_cached(entry, grid, args, kwargs, _state["stream"](device))


def _launch_cached(entry, grid, args, kwargs, stream) -> None:
    compiled, names, defaults = entry
    rest = [kwargs[n] if n in kwargs else d for n, d in zip(names, defaults)]
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, compiled.function,
                 compiled.packed_metadata, None, None, None, *args, *rest)


@contextlib.contextmanager
def uncached() -> Iterator[None]:
    """Every launch in the block through Triton's own `kernel[grid](...)` (to compare the two)."""
    previous = _state.get("fast")
    _state["fast"] = False
    try:
        yield
    finally:
        _state["fast"] = previous


def cached_signatures() -> int:
    """How many (kernel, device, argument signature) entries the launcher holds."""
    return len(_cache)


def _init() -> bool:
    from .dispatch import interpreting

    fast = False
    if not interpreting():
        try:
            from triton import knobs
            from triton.runtime import driver

            active = driver.active
            _state.update(device=active.get_current_device, stream=active.get_current_stream, knobs=knobs.runtime)
            fast = hasattr(knobs.runtime, "launch_enter_hook") and hasattr(knobs.runtime, "launch_exit_hook")
        except Exception:  # noqa: BLE001 -- an older or different Triton: its own launch path
            fast = False
    _state["fast"] = fast
    return fast


def _hooks_set() -> bool:
    """A launch hook (a profiler's) is set: Triton's path then calls it with the launch metadata."""
    runtime = _state["knobs"]
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):  # Triton 3.6+: an empty HookChain
            return True
    return False


def _signature(kernel, args, kwargs) -> tuple:
    """What the launch's compiled kernel depends on: constexprs by value, runtime arguments by what
    Triton specialises them on, or finer (inline: this runs on every launch)."""
    constexprs = _constexprs.get(id(kernel))
    if constexprs is None:
        constexprs = _constexprs[id(kernel)] = frozenset(kernel.constexprs)
    tensor = torch.Tensor
    sig = [
        a if i in constexprs
        else (a.dtype, not a.data_ptr() & 15) if isinstance(a, tensor)
        else (a == 1, not a & 15, -0x80000000 <= a <= 0x7FFFFFFF, a > 0x7FFFFFFFFFFFFFFF) if type(a) is int
        else float if type(a) is float
        else a  # bools and None by value
        for i, a in enumerate(args)
    ]
    for name, value in kwargs.items():  # constexprs and launch options, by value
        sig.append(name)
        sig.append(value if not isinstance(value, tensor) else (value.dtype, not value.data_ptr() & 15))
    sig.append(len(args))  # which parameters the keywords fill
    return tuple(sig)


def _plan(kernel, n_args: int, kwargs: dict) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """The parameters after the positional ones, in order, with their defaults (a missing one
    without a default was already an error in Triton's path)."""
    params = kernel.params[n_args:]
    return tuple(p.name for p in params), tuple(p.default if p.has_default else None for p in params)
