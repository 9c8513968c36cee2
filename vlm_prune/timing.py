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


def clock(device: torch.device | str | None = None) -> float:
    """Seconds on the host clock; synchronises `device` first when it is CUDA and
    VLM_PRUNE_SYNC_TIMINGS=1."""
    if device is not None and torch.device(device).type == "cuda" and os.environ.get("VLM_PRUNE_SYNC_TIMINGS") == "1":
        torch.cuda.synchronize(device)
    return time.perf_counter()
