"""The public entry points: patch / unpatch / pruned, and the handle they return."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .config import PruneConfig
from .registry import get_family, get_method

_HANDLE_ATTR = "_vlm_prune_handle"


class PruneHandle:
    """The pruning attached to one model instance.

    config: the validated PruneConfig.
    stats:  per sample of the last prefill, {"visual_tokens": n_in, "kept": n_kept}.
    kept_indices: per image of the last prefill, which visual tokens were passed on.
    timings: of the last prefill, {"vision_s": vision tower, "select_s": scoring + compaction,
        "positions_s": of select_s, the model's own position ids (Qwen's M-RoPE index, which the
        unpruned forward computes too)}
        (host clock; on CUDA set VLM_PRUNE_SYNC_TIMINGS=1 for exact figures, see vlm_prune.timing).
    """

    def __init__(self, model: torch.nn.Module, config: PruneConfig, family_patch: Any):
        self.model = model
        self.config = config
        self._patch = family_patch

    @property
    def stats(self) -> list[dict[str, int]]:
        return [dict(s) for s in self._patch.stats]

    @property
    def kept_indices(self) -> list[torch.Tensor]:
        """Per image of the last prefill (in prompt order): [K] int64 indices, increasing, of the
        visual tokens passed on (for merging methods, the token each output stands for)."""
        return list(self._patch.kept_indices)

    @property
    def layer_lengths(self) -> list[int]:
        """Tokens each decoder layer processed in the last prefill (longest row); feed it to
        `vlm_prune.flops.prefill_flops` for the configuration's theoretical FLOPs."""
        return list(self._patch.layer_lengths)

    @property
    def timings(self) -> dict[str, float]:
        return dict(self._patch.timings)

    @property
    def active(self) -> bool:
        return getattr(self.model, _HANDLE_ATTR, None) is self

    def remove(self) -> None:
        """Restores the model exactly (same as `vlm_prune.unpatch(model)`); idempotent."""
        if self.active:
            self._patch.remove()
            delattr(self.model, _HANDLE_ATTR)

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PruneHandle({type(self.model).__name__}, {self.config}, {state})"


def patch(model: torch.nn.Module, method: str, keep: Any = None, **options: Any) -> PruneHandle:
    """Prunes the visual tokens of one loaded transformers VLM instance, in place, reversibly.

    keep: int = visual tokens kept per image (keep=1 keeps one); float in (0, 1] = fraction kept
    (keep=1.0 keeps all). options: `positions`, `backend` and the method's own options.
    A pipeline runs one or more vision-stage methods, then at most one in-LLM method:
    `method="visionzip+transition"`, `keep=(192, 64)` (or the string form
    "visionzip:192+divprune:96+transition:64"; see `vlm_prune.pipeline_config`). Patching an
    already patched model replaces its configuration. On any error the model is left exactly as
    it was.
    """
    config = make_config(method, keep, **options)
    adapter = get_family(model)  # an unsupported model fails here
    family_patch = _engine(model, config, adapter) if isinstance(config, PruneConfig) else _pipeline(model, config,
                                                                                                      adapter)
    previous = getattr(model, _HANDLE_ATTR, None)
    if previous is not None:
        previous.remove()
    handle = PruneHandle(model, config, family_patch)
    family_patch.install()
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def make_config(method: str, keep: Any = None, **options: Any) -> Any:
    """The validated configuration `patch` applies (a PruneConfig, or a PipelineConfig), from its
    arguments alone: every check that needs no model (the same errors as `patch`)."""
    from .pipeline_config import is_pipeline, pipeline_config

    if is_pipeline(method):
        config = pipeline_config(method, keep, **options)
        if len(config.stages) == 1:  # one stage: that method alone
            return _preset(config.stages[0])
        _refuse_presets_inside(config)
        return config
    if "stage_options" in options:
        raise ValueError(f"stage_options applies to pipelines ('a+b'); method={method!r} is one method")
    if keep is None:
        raise TypeError(f"patch() needs keep= for method {method!r}")
    return _preset(PruneConfig.from_kwargs(method, keep, **options))


def _preset(config: PruneConfig) -> Any:
    """A method whose release runs several stages (VisionDrop: VisionZip, then its LLM stages)
    patched alone: the pipeline of those stages; any other method: its config unchanged."""
    from .pipeline_config import PipelineConfig

    stages = get_method(config.method)().preset(config)
    return config if stages is None else PipelineConfig(tuple(stages))


def _refuse_presets_inside(config: Any) -> None:
    for stage in config.stages:
        if stage.options.get("vision_stage"):
            raise ValueError(f"{stage.method}: vision_stage=True applies when it is patched alone; in a pipeline "
                             "the stage before it is the vision stage (drop the option)")


def _engine(model: torch.nn.Module, config: PruneConfig, adapter: Any) -> Any:
    if get_method(config.method).stage == "llm":
        from .patches.in_llm import LLMStageEngine as Engine  # validates the schedule against the depth
    else:
        from .patches.vision_stage import VisionStageEngine as Engine  # validates the model against the method
    return Engine(model, config, adapter)


def _pipeline(model: torch.nn.Module, config: Any, adapter: Any) -> Any:
    from .patches.pipeline import build

    return build(model, config, adapter)


def unpatch(model: torch.nn.Module) -> None:
    """Removes vlm_prune from `model`; a no-op if it is not patched."""
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()


def get_handle(model: torch.nn.Module) -> PruneHandle | None:
    """The active handle of a patched model, or None."""
    return getattr(model, _HANDLE_ATTR, None)


@contextlib.contextmanager
def pruned(model: torch.nn.Module, method: str, keep: Any = None, **options: Any) -> Iterator[PruneHandle]:
    """`with vlm_prune.pruned(model, "cls_attention", 64): ...` — patched inside the block only;
    a configuration active before the block is restored after it."""
    previous = get_handle(model)
    handle = patch(model, method, keep, **options)
    try:
        yield handle
    finally:
        handle.remove()
        if previous is not None:
            restored = patch(model, **previous.config.as_kwargs())
            previous._patch, previous.config = restored._patch, restored.config
            setattr(model, _HANDLE_ATTR, previous)
