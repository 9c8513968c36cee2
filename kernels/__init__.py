"""Hot-path ops of vlm_prune: a reference PyTorch implementation of each (the CPU path and the
test oracle), with fused Triton kernels beside them where they pay (see issue: kernels)."""

from .attention_received import attention_received
from .cls_attention import cls_attention_scores
from .llm_signals import attention_from_rows, transition_variation

__all__ = ["attention_from_rows", "attention_received", "cls_attention_scores", "transition_variation"]
