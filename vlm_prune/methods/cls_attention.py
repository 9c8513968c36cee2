"""`cls_attention`: keep the visual tokens the vision tower's [CLS] token attends to most.

FasterVLM (default): the [CLS] row of the attention in the layer that produces the LLM's
features (LLaVA: the layer whose output is hidden_states[vision_feature_layer]), heads averaged.
VTC-CLS: `layers=[-4, -3, -2]` sums the [CLS] rows of several vision layers (the paper's best
ensemble is layers 21-23 of 24, 1-indexed). Top-k, then raster order is restored.

The family patch computes only the [CLS] query row (softmax(q_cls . K^T * scale)) from the
layer's own q/k projections, so the vision tower keeps SDPA.
"""

from __future__ import annotations

from ..config import Option, optional_int_list
from ..registry import register_method
from .base import Reduction, VisionMethod


@register_method
class ClsAttention(VisionMethod):
    name = "cls_attention"
    needs = frozenset({"cls_attention"})
    paper = "FasterVLM (arXiv 2412.01818); VTC-CLS (arXiv 2412.05819)"
    release = ("github Theia-4869/FasterVLM @ f5d5f12, llava/model/llava_arch.py encode_images; "
               "github THU-MIG/VTC-CLS @ e41ac9b (layers ensemble)")
    default_budget = "per_crop"  # FasterVLM on LLaVA-NeXT: top-k of each crop, the base image too
    options = {
        "layers": Option(
            None,
            optional_int_list,
            "vision encoder layers (0-based, negative from the end) whose [CLS] attention is "
            "summed; None = the layer that produces the LLM's features",
        ),
    }

    def reduce(self, features, grid, k, signals, options) -> Reduction:
        from vlm_prune.kernels import top_k_selection

        return Reduction.of(top_k_selection(features, signals["cls_attention"], k))  # fused on the Triton backend
