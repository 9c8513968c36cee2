"""Pruning methods, one file each; importing this package registers them all."""

from . import cls_attention, fastv, pool, random_select, transition  # noqa: F401  (registration)
from .base import Method, Reduction, VisionMethod, gather_tokens, keep_top_k

__all__ = ["Method", "Reduction", "VisionMethod", "gather_tokens", "keep_top_k"]
