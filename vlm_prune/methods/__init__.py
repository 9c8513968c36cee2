"""Pruning methods, one file each; importing this package registers them all."""

from . import (  # noqa: F401  (registration)
    cdpruner, cls_attention, dct, divprune, evs, fastv, fopru, globalcom2, pool, random_select, text_recovery, transition, visiondrop,
    visionzip,
)
from .base import Method, Reduction, VisionMethod, gather_tokens, keep_top_k

__all__ = ["Method", "Reduction", "VisionMethod", "gather_tokens", "keep_top_k"]
