"""What a pruning method is: its stage, the signals it needs, its options, its reduction.

Methods are pure torch and import no model code; a family patch (vlm_prune.patches) gathers
the signals a method declares in `needs` and hands them over as tensors.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from ..config import COMMON_OPTIONS, Option

# Signals a family patch can provide to a vision-stage method, per image:
#   "cls_attention": [I, N] attention of the vision tower's [CLS] query to each visual token
#                    (heads averaged; summed over the layers in the `layers` option).
#   "keys":          [I, N, Dk] keys of the same vision layer (LLaVA) / last block (Qwen)
#   "question":      [I, D] per image: mean LLM input embedding of the instruction tokens
SIGNALS = ("cls_attention", "keys", "question")


class Reduction:
    """The visual tokens that go on to the LLM, for a group of images of equal token count.

    features: [I, K, D] tokens in raster order (kept tokens, or merged ones).
    index:    [I, K] int64, strictly increasing per row: the original token each output
              token stands for (its own index when kept; a representative when merged).
              Position ids under positions="original" come from here.
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
    options: ClassVar[Mapping[str, Option]] = {}
    paper: ClassVar[str] = ""

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


class VisionMethod(Method):
    """A method that reduces each image's visual tokens before the LLM runs."""

    stage: ClassVar[str] = "vision"
    # True: the method prefers the vision features before the projector where a family can
    # project its output afterwards (LLaVA-1.5); elsewhere it gets the LLM-space tokens.
    uses_pre_projection: ClassVar[bool] = False

    def output_count(self, k: int, grid: tuple[int, int], options: Mapping[str, Any]) -> int | None:
        """Tokens `reduce` returns per image for budget k on `grid`, known before the image is
        seen (vLLM reserves placeholders up front); None if it depends on the image."""
        return min(k, grid[0] * grid[1])

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


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, in increasing (raster) order: [I, N] -> [I, k].
    Ties go to the lower index. Runs the Triton kernel under the Triton backend."""
    from vlm_prune.kernels import top_k_in_order

    return top_k_in_order(scores, k)


def gather_tokens(features: torch.Tensor, index: torch.Tensor) -> Reduction:
    """features [I, N, D], index [I, K] -> Reduction with features [I, K, D]."""
    picked = features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    return Reduction(features=picked, index=index)
