"""Hot-path ops of vlm_prune: a reference PyTorch implementation of each (the CPU path and the
test oracle) beside a fused Triton kernel where it pays, behind one dispatch point
(`dispatch.fused_or_reference`; PruneConfig.backend = "auto" | "torch" | "triton").
`compile_check` compiles every kernel for GPUs on a machine without one."""

from .attention_received import attention_received
from .cls_attention import cls_attention_scores, cls_attention_scores_ref
from .dispatch import use_backend
from .llm_signals import attention_from_rows, transition_variation, transition_variation_ref
from .topk import Selection, select_top_k, top_k_in_order, top_k_in_order_ref, top_k_selection

__all__ = [
    "attention_from_rows", "attention_received", "cls_attention_scores", "cls_attention_scores_ref",
    "Selection", "select_top_k", "top_k_in_order", "top_k_in_order_ref", "top_k_selection", "transition_variation",
    "transition_variation_ref", "use_backend",
]
