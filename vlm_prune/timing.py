"""Host clock for `PruneHandle.timings`.

CUDA work is asynchronous, so a plain host clock around GPU ops measures launch time, and the
first op that waits (a `.tolist()`) charges everything queued before it -- the vision tower, say
-- to the wrong stage. With VLM_PRUNE_SYNC_TIMINGS=1 every reading first synchronises the device,
which makes the timings exact at the cost of a pipeline bubble per reading; benchmarks set it.
It is off by default so that timing never slows a real prefill.
"""

from __future__ import annotations

import os
import time

import torch


def clock(where: torch.nn.Module | torch.device | str | None = None) -> float:
    """Seconds on the host clock; first synchronises the device of `where` (a module, e.g. the
    model, or a device) when it is CUDA and VLM_PRUNE_SYNC_TIMINGS=1. The device is looked up
    only then: this runs in per-layer hooks."""
    if where is not None and os.environ.get("VLM_PRUNE_SYNC_TIMINGS") == "1":
        device = torch.device(where.device if isinstance(where, torch.nn.Module) else where)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter()
