"""Config-driven loading: a checkpoint folder that carries its own pruning.

    model = vlm_prune.from_pretrained("./llava-pruned")        # patched as config.json's block says
    handle = vlm_prune.get_handle(model)                         # stats, kept_indices, timings
    vlm_prune.save_pretrained(model, "./llava-pruned", processor)  # writes the block back

The block is config.json's `vlm_prune` entry, the one the vLLM plugin reads (there it may also
come from `--hf-overrides '{"vlm_prune": {...}}'`): the keyword arguments of `vlm_prune.patch`
as a JSON object, `{"method": "cls_attention", "keep": 64, "positions": "original", ...}`. A
pipeline is `{"method": "visionzip+transition", "keep": [192, 64], "stage_options": [{...},
{...}]}` (transformers only for now). So one saved folder is pruned in transformers and in vLLM
without code. See docs/loading.md.
"""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path
from typing import Any

from .api import get_handle, make_config, patch
from .config import PruneConfig
from .pipeline_config import PipelineConfig
from .registry import FAMILIES, get_method, supported_model_types

BLOCK = "vlm_prune"  # the config.json key; the vLLM plugin reads the same one


def from_pretrained(path: str | Path, prune: Any = None, **from_pretrained_kwargs: Any):
    """Loads a VLM checkpoint and prunes it as its config.json's `vlm_prune` block says.

    path: a folder or hub id, as for transformers' `from_pretrained`; `from_pretrained_kwargs`
        (dtype, device_map, revision, local_files_only, ...) go to it unchanged.
    prune: None = the checkpoint's block (none: the model is returned unpatched); False = load
        unpatched whatever the block says; a dict of the block's form or a configuration string
        ("cls_attention:64", "visionzip:192+transition:64") = this instead of the block.

    Returns the model, like `AutoModelForImageTextToText.from_pretrained` (the class comes from
    the checkpoint's model_type; a model_type that class does not know falls back to the class
    config.json's `architectures` names). The processor is loaded as usual,
    `AutoProcessor.from_pretrained(path)`; the handle is `vlm_prune.get_handle(model)` (None when
    unpatched). `model.config.vlm_prune` is set to the block applied (removed when unpatched), so
    a plain `model.save_pretrained` keeps it; `vlm_prune.save_pretrained` writes the active one.

    A bad block or `prune=` raises the ValueError / TypeError `vlm_prune.patch` raises, naming the
    bad value, before any weight is read; checks that need the model itself (a layer beyond the
    model's depth, a method for another family) fail after loading, with the model discarded.
    """
    from transformers import PretrainedConfig

    config = from_pretrained_kwargs.get("config")
    if config is not None and not isinstance(config, (str, Path)):  # a config object given: its block
        config_dict, source = config.to_dict(), "the given config"
    else:
        # config.json alone (no weights): the block is checked before anything large is read
        config_dict, _ = PretrainedConfig.get_config_dict(str(config or path), **from_pretrained_kwargs)
        source = f"{path}: config.json"
    kwargs = _wanted(prune, config_dict.get(BLOCK), source, config_dict.get("model_type"))
    model = _model_class(config_dict).from_pretrained(str(path), **from_pretrained_kwargs)
    if kwargs is None:
        if hasattr(model.config, BLOCK):  # prune=False: a later model.save_pretrained must not re-enable it
            delattr(model.config, BLOCK)
        return model
    handle = patch(model, **kwargs)
    setattr(model.config, BLOCK, block_of(handle.config))
    return model


def save_pretrained(model, path: str | Path, processor: Any = None) -> Path:
    """Saves `model` (and `processor`) to the folder `path`, with the active pruning as config.json's
    `vlm_prune` block, in the layout both transformers and vLLM load.

    The weights go through the model's own `save_pretrained`, by
    `vlm_prune.vllm_plugin.checkpoint.save_for_vllm` (LLaVA's vision tower renamed to the layout
    vLLM reads, Qwen's video processor config written: pass `processor=` so the folder is complete
    for vLLM and `AutoProcessor`). An unpatched model is saved without a block (one loaded with a
    block and unpatched since loses it). A configuration vLLM's plugin cannot serve (in-LLM
    methods, pipelines) is saved all the same, with a warning saying why vLLM would refuse it.
    Returns the folder.
    """
    from .vllm_plugin.checkpoint import save_for_vllm

    handle = get_handle(model)
    block = block_of(handle.config) if handle is not None else None  # fails before anything is written
    path = save_for_vllm(model, processor, path)
    _write_block(path, block)
    if block is not None:
        refusal = _vllm_refusal(block, model.config.model_type)
        if refusal:
            warnings.warn(f"saved {path} for transformers; vLLM's plugin would refuse its vlm_prune block: {refusal}",
                          stacklevel=2)
    return path


def block_of(config: PruneConfig | PipelineConfig) -> dict[str, Any]:
    """The config.json block that rebuilds `config` (a handle's `.config`): method, keep, and the
    options that differ from the method's defaults, as JSON values (tuples become lists)."""
    if isinstance(config, PipelineConfig):
        block = {"method": config.method, "keep": list(config.keep)}
        stage_options = [_options_of(stage) for stage in config.stages]
        if any(stage_options):
            block["stage_options"] = stage_options
    else:
        block = {"method": config.method, "keep": config.keep, **_options_of(config)}
    return json.loads(json.dumps(block))  # a value JSON cannot hold fails here, not half-way through a save


def _options_of(config: PruneConfig) -> dict[str, Any]:
    # defaults are left out: the block stays what a person writes in --hf-overrides, and
    # re-validation fills them in the same (validate_options takes absent options as the default)
    specs = get_method(config.method).options
    common = {"positions": config.positions, "budget": config.budget, "video_budget": config.video_budget,
              "backend": None if config.backend == "auto" else config.backend}
    return {**{k: v for k, v in common.items() if v is not None},
            **{k: v for k, v in config.options.items() if v != specs[k].default}}


def _wanted(prune: Any, block: Any, source: str, model_type: str | None) -> dict[str, Any] | None:
    """The keyword arguments of `vlm_prune.patch` to apply (None: load unpatched), validated
    without the model; errors name where the configuration came from."""
    if prune is False:
        return None
    if prune is None:
        if block is None:
            return None
        where, spec = f"{source}'s {BLOCK} block", block
    elif isinstance(prune, (dict, str)):
        where, spec = f"prune={prune!r}", prune
    else:
        raise TypeError(f"prune={prune!r}: pass None (the checkpoint's {BLOCK} block), False (unpatched), "
                        "a dict like the block or a configuration string such as 'cls_attention:64'")
    try:
        # a string is a configuration string only as prune=; in config.json the block is an
        # object, as the vLLM plugin requires
        kwargs = {"method": spec} if isinstance(prune, str) else _block_kwargs(spec)
        make_config(**kwargs)
        if model_type not in FAMILIES:
            raise ValueError(f"model_type {model_type!r} is not supported; supported model_type values: "
                             f"{supported_model_types()}")
    except (ValueError, TypeError) as error:
        raise type(error)(f"{where}: {error}") from None
    return kwargs


def _block_kwargs(block: Any) -> dict[str, Any]:
    # the plugin's own reading of the block (same shape check, same message), without its
    # $VLM_PRUNE fallback: the environment is a vLLM-side switch
    from .vllm_plugin.config import raw_options

    return raw_options(types.SimpleNamespace(**{BLOCK: block}))


def _model_class(config_dict: dict[str, Any]):
    """AutoModelForImageTextToText (it maps every supported model_type); for a model_type it does
    not know (an older transformers), the class config.json's `architectures` names."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if config_dict.get("model_type") not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        for name in config_dict.get("architectures") or ():
            if hasattr(transformers, name):
                return getattr(transformers, name)
    return transformers.AutoModelForImageTextToText  # else its own error names the model_type


def _write_block(path: Path, block: dict[str, Any] | None) -> None:
    """Sets (or, for None, removes) config.json's block, in the format transformers writes."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config.pop(BLOCK, None)  # a stale block from model.config never survives
    if block is not None:
        config[BLOCK] = block
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _vllm_refusal(block: dict[str, Any], model_type: str) -> str | None:
    """Why the vLLM plugin would refuse `block` at engine start-up (its own checks), else None."""
    from .vllm_plugin.config import plugin_config

    family = model_type if model_type in ("llava", "llava_next") else "qwen2_vl"  # the plugin's family names
    try:
        plugin_config(types.SimpleNamespace(**{BLOCK: dict(block)}), family)
    except (ValueError, TypeError) as error:
        return str(error)
    return None
