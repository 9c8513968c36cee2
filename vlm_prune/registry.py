"""Two registries: method name -> method class, and `config.model_type` -> family adapter.

A new method is one file in vlm_prune/methods plus `@register_method`; a new model family is
one adapter file in patches/adapters/ plus one line in FAMILIES.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .methods.base import Method

_METHODS: dict[str, type["Method"]] = {}

# model_type -> "module:Class" of its family adapter (patches/adapters/), imported on first use.
FAMILIES: dict[str, str] = {
    "llava": "vlm_prune.patches.adapters.llava:LlavaAdapter",
    "llava_next": "vlm_prune.patches.adapters.llava_next:LlavaNextAdapter",
    "qwen2_vl": "vlm_prune.patches.adapters.qwen2_vl:QwenVLAdapter",
    "qwen2_5_vl": "vlm_prune.patches.adapters.qwen2_vl:QwenVLAdapter",
    "qwen3_vl": "vlm_prune.patches.adapters.qwen3_vl:Qwen3VLAdapter",
    "qwen3_vl_moe": "vlm_prune.patches.adapters.qwen3_vl:Qwen3VLAdapter",
    "qwen3_5": "vlm_prune.patches.adapters.qwen3_5:Qwen3_5Adapter",
    "qwen3_5_moe": "vlm_prune.patches.adapters.qwen3_5:Qwen3_5Adapter",
}


def register_method(cls: type["Method"]) -> type["Method"]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load_methods() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods)


def available_methods() -> list[str]:
    """Names accepted by `vlm_prune.patch(model, method=...)`, sorted."""
    _load_methods()
    return sorted(_METHODS)


def get_method(name: str) -> type["Method"]:
    _load_methods()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(_METHODS)}")
    return _METHODS[name]


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def get_family(model):
    """The family adapter class for a loaded transformers model, from `config.model_type`."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model: {type(model).__name__} (model_type={model_type!r}); "
            f"supported model_type values: {supported_model_types()}"
        )
    if not hasattr(getattr(model, "model", None), "language_model"):
        raise ValueError(
            f"vlm_prune.patch takes the model with the language-model head (e.g. LlavaForConditionalGeneration, "
            f"Qwen2VLForConditionalGeneration); {type(model).__name__} is not one -- patch the model that holds it"
        )
    module_name, class_name = FAMILIES[model_type].split(":")
    return getattr(importlib.import_module(module_name), class_name)
