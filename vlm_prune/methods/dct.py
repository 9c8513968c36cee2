"""`dct`: Fourier-VLM -- low-pass the visual feature grid in the frequency domain.

The released rules (Fourier Compressor, github whyisverysmart/Fourier-Compressor @ 1f98b38;
`fourier_compressor/compress.py`, `integrations/qwen_vl/helpers.py`, `integrations/llava/`):
the h x w grid of D-dim features goes through an orthonormal 2D DCT-II; the top-left r x c block
of low frequencies is kept and an orthonormal inverse DCT of size r x c turns it back into
r x c spatial tokens on a coarser grid, in raster order. Both transforms are small matmuls with
bases cached per size: out = (B_r^T A_h[:r]) X (B_c^T A_w[:c])^T.

- LLaVA-1.5: on the vision features before the projector (24x24 -> 12x12 by default).
- Qwen2-VL / 2.5-VL: on the merger's output, per frame; the image's grid_thw shrinks to the
  coarse grid, so M-RoPE numbers the output as an image of that smaller grid and the text after
  it continues from the smaller extent (positions="renumber", the default there);
  positions="original" instead gives each output token the position of the centre token of its
  cell and leaves the text's positions as the unpruned model has them.
- LLaVA-NeXT: the release has no anyres path; here each region (budget policy) is low-passed on
  the LLM-space tokens after the projector.

(r, c) is the largest grid within the budget whose aspect is closest to h / w (the same rule as
`pool`); the release sets r = int(h * ratio) per axis (ratio 2/3 on Qwen, r = 12 on LLaVA):
pick `keep` accordingly to reproduce a release setting.

An N-point orthonormal DCT followed by an r-point inverse scales a constant signal by
sqrt(N / r) per axis; the release keeps that scaling (rescale=False, the default: its models
are fine-tuned with the compressor). `rescale=True` (a departure, for training-free use)
multiplies by sqrt(r c / (h w)) so a constant grid stays constant and the LLM's input keeps its
magnitude -- measure both on your model.
"""

from __future__ import annotations

import functools
import math

import torch

from ..config import Option, choice
from ..registry import register_method
from .base import Reduction
from .pool import CoarseGridMethod, coarse_grid


@functools.lru_cache(maxsize=64)
def dct_matrix(n: int) -> torch.Tensor:
    """[n, n] orthonormal DCT-II basis (float64): X = A x, x = A^T X."""
    with torch.inference_mode(False):  # cached: a normal tensor even if first made under inference_mode
        k = torch.arange(n, dtype=torch.float64)[:, None]
        i = torch.arange(n, dtype=torch.float64)[None, :]
        basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
        basis[0] /= math.sqrt(2.0)
    return basis


@functools.lru_cache(maxsize=64)
def low_pass_matrix(n: int, keep: int, device: torch.device) -> torch.Tensor:
    """[keep, n] float32 on `device`: forward DCT, crop to the `keep` lowest frequencies and
    inverse DCT of that size along one axis, as one matrix (B_keep^T A_n[:keep]). Cached per
    device, so a prefill copies no basis to the GPU."""
    with torch.inference_mode(False):
        return (dct_matrix(keep).T @ dct_matrix(n)[:keep]).to(device, torch.float32)


def low_pass(grid: torch.Tensor, rows: int, cols: int, rescale: bool = True) -> torch.Tensor:
    """grid [I, h, w, D] -> [I, rows, cols, D]: keep the rows x cols lowest DCT frequencies."""
    h, w = grid.shape[1:3]
    left, right = low_pass_matrix(h, rows, grid.device), low_pass_matrix(w, cols, grid.device)
    out = torch.einsum("rh,ihwd,cw->ircd", left, grid.float(), right)
    if rescale:
        out = out * math.sqrt(rows * cols / (h * w))
    return out.to(grid.dtype).contiguous()  # einsum may return a permuted layout; vLLM's CPU GEMM needs rows


@register_method
class DCT(CoarseGridMethod):
    name = "dct"
    uses_pre_projection = True
    paper = "Fourier-VLM: Compressing Vision Tokens in the Frequency Domain (2025)"
    release = "github whyisverysmart/Fourier-Compressor @ 1f98b38, fourier_compressor/compress.py + integrations/"
    release_positions = "renumber"  # Qwen-VL: grid_thw shrinks to the coarse grid
    options = {
        "rescale": Option(False, choice(True, False),
                          "multiply by sqrt(r c / (h w)) so a constant grid stays constant (a departure: the "
                          "release keeps the transform's scaling)"),
    }

    def reduce(self, features, grid, k, signals, options) -> Reduction:
        h, w = grid
        n_images, _, dim = features.shape
        rows, cols, index = coarse_grid(k, grid, n_images, features.device)
        if (rows, cols) == (h, w):  # nothing to cut: exactly the identity
            return Reduction(features=features, index=index)
        out = low_pass(features.view(n_images, h, w, dim), rows, cols, options["rescale"])
        return Reduction(features=out.reshape(n_images, rows * cols, dim), index=index)
