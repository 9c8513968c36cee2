"""What a pruning method is: its stage, the signals it needs, its options, its reduction.

Methods are pure torch and import no model code; a family patch (vlm_prune.patches) gathers
the signals a method declares in `needs` and hands them over as tensors.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import torch

from ..config import COMMON_OPTIONS, Option

# Signals a family patch can provide to a vision-stage method, per image:
#   "cls_attention": [I, N] attention of the vision tower's [CLS] query to each visual token
#                    (heads averaged; summed over the layers in the `layers` option).
#   "keys":          [I, N, Dk] keys of the same vision layer (LLaVA) / last block (Qwen),
#                    averaged over heads
#   "question":      [I, D] per image: mean LLM input embedding of the instruction tokens
#   "cls_feature":   [I, Dv] per image (LLaVA-NeXT: per crop): the tower's [CLS] feature at the
#                    feature layer, before the projector (towers with a [CLS] token only)
#   "llm_features":  [I, N, D] the tokens in the LLM's space, for methods that reduce the
#                    tokens before the projector (`uses_pre_projection`) but compare in that space
#   "cls_logits":    [I, N] the [CLS] row before the softmax (q . k * scale, heads averaged),
#                    LLaVA-NeXT (GlobalCom²'s score)
SIGNALS = ("cls_attention", "keys", "question", "cls_feature", "llm_features", "cls_logits")


class Reduction:
    """The visual tokens that go on to the LLM, for a group of images of equal token count.

    features: [I, K, D] tokens in the order the LLM receives them: raster order (kept tokens,
              or merged ones), unless the method orders them otherwise under renumbered
              positions (VisionZip's release layout).
    index:    [I, K] int64, strictly increasing per row: the slots the output tokens occupy,
              i.e. the original token each output token stands for (its own index when kept;
              a representative when merged). Position ids under positions="original" come
              from here, so a method that orders its tokens otherwise does so only under
              renumbered positions.
    Methods whose count varies per image give lists of [K_i, D] / [K_i] instead.

    `Reduction.of(selection)` wraps a top-k that keeps tokens unchanged
    (`vlm_prune.kernels.top_k_selection`): features and index are then gathered only when
    read, and the prefill engine copies the kept tokens straight into the LLM's input.
    """

    def __init__(self, features, index):
        self._features, self._index = features, index
        self.selection = None

    @classmethod
    def of(cls, selection) -> "Reduction":
        reduction = cls(None, None)
        reduction.selection = selection
        return reduction

    @property
    def features(self):
        return self.selection.features if self.selection is not None else self._features

    @property
    def index(self):
        return self.selection.index if self.selection is not None else self._index


class Method:
    """Base of all methods. Subclasses set `name`, `stage`, `needs`, `options`, `paper`."""

    name: ClassVar[str]
    stage: ClassVar[str]  # "vision" (before the LLM) or "llm" (inside the decoder)
    needs: ClassVar[frozenset[str]] = frozenset()
    # signals of `needs` used when a family can provide them, and done without otherwise
    optional_needs: ClassVar[frozenset[str]] = frozenset()
    options: ClassVar[Mapping[str, Option]] = {}
    paper: ClassVar[str] = ""
    # the released code the default follows: "github owner/repo @ commit, files"
    release: ClassVar[str] = ""

    @classmethod
    def validate_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Checks option names and values; returns all options with defaults filled in."""
        unknown = sorted(set(given) - set(cls.options))
        if unknown:
            allowed = sorted(cls.options) + list(COMMON_OPTIONS)
            raise ValueError(
                f"unknown option(s) {unknown} for method {cls.name!r}; allowed: {allowed}"
            )
        out = {}
        for name, spec in cls.options.items():
            value = given.get(name, spec.default)
            out[name] = value if name not in given else spec.check(name, value)
        return out

    def preset(self, config: Any) -> list | None:
        """A method whose release runs several stages (VisionDrop: VisionZip, then LLM stages)
        returns, patched alone, the PruneConfigs of those stages; None (the default): itself."""
        return None


class VisionMethod(Method):
    """A method that reduces each image's visual tokens before the LLM runs."""

    stage: ClassVar[str] = "vision"
    # True: the method prefers the vision features before the projector where a family can
    # project its output afterwards (LLaVA-1.5); elsewhere it gets the LLM-space tokens.
    uses_pre_projection: ClassVar[bool] = False
    # the budget policy when the user sets none (it matters for LLaVA-NeXT's crops only)
    default_budget: ClassVar[str] = "per_image"
    # whether `reduce` outputs a coarser grid (pool, dct): such methods need a region's grid,
    # and an M-RoPE family can number their output as an image of that grid
    output_is_grid: ClassVar[bool] = False
    # the position policy of the release where a family allows more than one; None: the family's
    release_positions: ClassVar[str | None] = None
    # the video budget policies the method supports (see PruneConfig.video_budget), default first
    video_budgets: ClassVar[tuple[str, ...]] = ("per_frame", "per_video")
    # how a fractional keep becomes a count: "nearest" (round) or "floor" (vLLM EVS's rule)
    budget_rounding: ClassVar[str] = "nearest"

    def cls_score(self, options: Mapping[str, Any]) -> tuple[tuple[int, ...] | None, bool]:
        """How the family computes "cls_attention" for this method: (vision layers, summed --
        None: the layer that produces the LLM's features -- and whether the [CLS] row is one
        head over the layer's full width instead of the heads' average). Towers without a
        [CLS] token use their own fallback score."""
        return options.get("layers"), False

    def resolve_options(self, options: Mapping[str, Any], positions: str) -> dict[str, Any]:
        """The options `reduce` runs with under the engine's position policy ("renumber" or
        "original"): "auto" values resolved, combinations the policy cannot number refused
        (ValueError). Called once, when a model is patched or a vLLM engine starts."""
        return dict(options)

    def output_grid(self, k: int, grid: tuple[int, int], options: Mapping[str, Any]) -> tuple[int, int] | None:
        """(rows, cols) of the coarser grid `reduce` outputs for budget k on `grid` (methods with
        `output_is_grid`), else None."""
        return None

    def output_count(self, k: int, grid: tuple[int, int], options: Mapping[str, Any]) -> int | None:
        """Tokens `reduce` returns per image for budget k on `grid`, known before the image is
        seen (vLLM reserves placeholders up front); None if it depends on the image."""
        return min(k, math.prod(grid))

    def reduce(
        self,
        features: torch.Tensor,
        grid: tuple[int, int],
        k: int,
        signals: Mapping[str, torch.Tensor],
        options: Mapping[str, Any],
    ) -> Reduction:
        """features: [I, N, D] visual tokens of I images in raster order over `grid` (h, w),
        h * w == N. k: tokens to keep per image (1 <= k <= N). Returns <= k tokens per image."""
        raise NotImplementedError


def layout_option(release: str) -> Option:
    """The `layout` option of methods whose released output is not in raster order (`release`
    says what that order is): "release" needs renumbered positions, "raster" orders the tokens
    by the slot each stands for, "auto" picks by the position policy (`resolve_layout`)."""
    from ..config import choice

    return Option("auto", choice("auto", "release", "raster"),
                  f"'release': {release}; 'raster': raster order of what each token stands for; "
                  "'auto': release under renumbered positions, raster under original ones")


def resolve_layout(options: Mapping[str, Any], positions: str, method: str, why: str) -> dict[str, Any]:
    """`options` with its "auto" layout resolved for the position policy; layout="release" with
    original positions refused (`why`: what the release's order does that they cannot number)."""
    layout = options["layout"]
    if layout == "auto":
        layout = "release" if positions == "renumber" else "raster"
    elif layout == "release" and positions == "original":
        raise ValueError(f"{method} layout='release' {why}, which positions='original' cannot number; use "
                         "layout='raster' or positions='renumber'")
    return {**options, "layout": layout}


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, in increasing (raster) order: [I, N] -> [I, k].
    Ties go to the lower index. Runs the Triton kernel under the Triton backend."""
    from vlm_prune.kernels import top_k_in_order

    return top_k_in_order(scores, k)


def gather_tokens(features: torch.Tensor, index: torch.Tensor) -> Reduction:
    """features [I, N, D], index [I, K] -> Reduction with features [I, K, D]."""
    picked = features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    return Reduction(features=picked, index=index)
