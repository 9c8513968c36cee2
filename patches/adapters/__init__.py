"""Family adapters: one file per model family, the only code that names its transformers
internals (see base.py for what an adapter offers the engines)."""

from .base import AttentionParts, DecoderParts, FamilyAdapter, LayerParts, Plan, llama_style_decoder

__all__ = ["AttentionParts", "DecoderParts", "FamilyAdapter", "LayerParts", "Plan", "llama_style_decoder"]
