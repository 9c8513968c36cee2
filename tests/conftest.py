"""Shared fixtures: tiny random-weight LLaVA models built from configs, offline processors."""

from __future__ import annotations

import os

# The Triton kernels run on CPU tensors only in the interpreter, which must be chosen before
# the kernel module is imported (GPU runs set TRITON_INTERPRET=0 to test the compiled kernels).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import vlm_prune  # noqa: E402
from vlm_prune import tiny  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add contention on the 2-core CI machine


@pytest.fixture(scope="session")
def llava():
    """(model, processor): CLIP 112/14 (8x8 = 64 visual tokens, 3 layers) + 2-layer Llama."""
    model, processor = tiny.llava(seed=0)
    return model, processor


@pytest.fixture(autouse=True)
def _unpatch_shared(llava):
    """Every test starts and ends with the shared model unpatched."""
    vlm_prune.unpatch(llava[0])
    yield
    vlm_prune.unpatch(llava[0])


@pytest.fixture
def garbage_buffers(monkeypatch):
    """Every buffer the fused kernels' launchers allocate (`kernels.buffers.empty`) starts as
    garbage (NaN / -77; 1 for byte masks), so an element a kernel never writes fails the test."""
    from vlm_prune.kernels import buffers

    def empty(*shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else (1 if dtype == torch.uint8 else -77)
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(buffers, "empty", empty)


def llava_inputs(processor, prompts, sizes, seeds=None):
    """Batched processor inputs: one image per `<image>` in each prompt, sizes as (w, h)."""
    seeds = seeds or list(range(len(sizes)))
    images = [tiny.random_image(w, h, seed=s) for (w, h), s in zip(sizes, seeds)]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)
