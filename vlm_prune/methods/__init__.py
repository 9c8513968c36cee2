"""Pruning methods, one file each; importing this package registers them all."""

from . import cls_attention, pool, random_select  # noqa: F401  (registration side effect)
from .base import Method, Reduction, VisionMethod, gather_tokens, keep_top_k

__all__ = ["Method", "Reduction", "VisionMethod", "gather_tokens", "keep_top_k"]
