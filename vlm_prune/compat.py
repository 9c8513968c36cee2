"""Everything that differs between the transformers releases we support (5.16 -> newest 5.x)."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

# transformers 5.2x renamed the decoder argument `past_key_values` to `cache`; both spellings
# reach a model forward depending on the release (and on the caller).
CACHE_KWARGS = ("cache", "past_key_values")


def get_cache(kwargs: dict[str, Any]) -> Any:
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_length(cache: Any) -> int:
    """Tokens already in a KV cache (0 for None or an empty cache)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuples
        return int(cache[0][0].shape[-2])
    return 0


def is_static_cache(cache: Any) -> bool:
    """A cache of fixed-size per-layer buffers (generate(cache_implementation="static"))."""
    return bool(getattr(cache, "is_compileable", False))


def static_cache_slots(cache: Any) -> int | None:
    """The key slots every layer of a static cache holds (None for any other cache)."""
    if not is_static_cache(cache):
        return None
    for name in ("get_max_length", "get_max_cache_shape"):  # transformers 5.2x, earlier releases
        getter = getattr(cache, name, None)
        slots = getter() if getter is not None else None
        if isinstance(slots, int) and slots > 0:
            return slots
    return None


def layer_keys(cache: Any, layer: int) -> torch.Tensor:
    """[B, G, T, Dh] the keys a dynamic KV cache holds for one layer."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.54
        return layers[layer].keys
    return cache.key_cache[layer]


def bind_to_kwargs(forward: Callable, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turns positional arguments of a module call into keywords (LLaVA-NeXT passes input_ids
    positionally to its inner model)."""
    if not args:
        return dict(kwargs)
    names = [
        p.name
        for p in inspect.signature(forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound



def vision_window_index(visual: Any, grid_thw: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL's window permutation of merge units: permuted[j] = raster[index[j]]."""
    try:  # transformers >= 5.2x
        from transformers.vision_utils import get_vision_window_index
    except ImportError:  # older releases keep it on the vision tower
        return visual.get_window_index(grid_thw)[0]
    config = visual.config
    index, _ = get_vision_window_index(
        grid_thw, spatial_merge_size=config.spatial_merge_size, window_size=config.window_size,
        patch_size=config.patch_size,
    )
    return index


# transformers 5.2x: generate() runs the vision tower before the first forward and hands its
# output on as `mm_encoder_outputs={"image": ..., "video": ...}`; earlier releases pass pixels.
ENCODED_KWARG = "mm_encoder_outputs"


def pre_encoded(kwargs: dict[str, Any], modality: str = "image") -> Any:
    """The encoder output of `modality` computed before the forward, or None."""
    return (kwargs.get(ENCODED_KWARG) or {}).get(modality)


def without_pre_encoded(kwargs: dict[str, Any], modality: str = "image") -> dict[str, Any]:
    """`kwargs` without the pre-computed encoder output of `modality` (others pass through)."""
    encoded = kwargs.get(ENCODED_KWARG)
    if not encoded:
        return kwargs
    rest = {k: v for k, v in encoded.items() if k != modality}
    return {**kwargs, ENCODED_KWARG: rest or None}


def encoded_features(output: Any) -> tuple[torch.Tensor, ...] | None:
    """Per image, the features an image encoder returned (`pooler_output` of its output object),
    or None when it returned something else (a caller's return_dict=False tuple)."""
    features = getattr(output, "pooler_output", None)
    return None if features is None else tuple(features)


def causal_lm_loss(model: Any, logits: torch.Tensor, labels: torch.Tensor, **extra: Any) -> torch.Tensor:
    """The model's own causal-LM loss (`loss_function`, which reads the text vocabulary size)."""
    text_config = getattr(model.config, "text_config", model.config)
    return model.loss_function(logits=logits, labels=labels, vocab_size=text_config.vocab_size, **extra)
