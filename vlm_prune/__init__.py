"""vlm_prune: training-free visual token pruning for vision-language models.

    import vlm_prune
    handle = vlm_prune.patch(model, method="cls_attention", keep=64)
    model.generate(**inputs)
    handle.stats            # [{"visual_tokens": 576, "kept": 64}, ...]
    vlm_prune.unpatch(model)
"""

from .api import PruneHandle, get_handle, patch, pruned, unpatch
from .config import PruneConfig
from .registry import available_methods, supported_model_types

__version__ = "0.1.0"

__all__ = [
    "PruneConfig",
    "PruneHandle",
    "available_methods",
    "get_handle",
    "patch",
    "pruned",
    "supported_model_types",
    "unpatch",
]
