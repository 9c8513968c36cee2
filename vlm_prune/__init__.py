"""vlm_prune: training-free visual token pruning for vision-language models.

    import vlm_prune
    handle = vlm_prune.patch(model, method="cls_attention", keep=64)
    model.generate(**inputs)
    handle.stats            # [{"visual_tokens": 576, "kept": 64}, ...]
    vlm_prune.unpatch(model)

    model = vlm_prune.from_pretrained("./pruned")      # patched as config.json's vlm_prune block says
    vlm_prune.save_pretrained(model, "./pruned", processor)   # writes that block (docs/loading.md)
"""

from .api import PruneHandle, get_handle, patch, pruned, unpatch
from .compiled import CompiledLanguageModel, compile_language_model, uncompile_language_model
from .config import PruneConfig
from .loading import from_pretrained, save_pretrained
from .registry import available_methods, supported_model_types

__version__ = "0.1.0"

__all__ = [
    "CompiledLanguageModel",
    "PruneConfig",
    "PruneHandle",
    "available_methods",
    "compile_language_model",
    "from_pretrained",
    "get_handle",
    "patch",
    "pruned",
    "save_pretrained",
    "supported_model_types",
    "uncompile_language_model",
    "unpatch",
]
