"""`PruneConfig`: one validated pruning configuration, and the option specs methods declare.

Validation happens at construction, before anything is patched: a bad value raises
`ValueError` (or `TypeError` for a wrong type) naming the field, the value and what is allowed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

POSITION_POLICIES = ("renumber", "original")
BUDGET_POLICIES = ("per_image", "per_crop", "pooled")
VIDEO_BUDGET_POLICIES = ("per_frame", "per_video")
BACKENDS = ("auto", "torch", "triton")
COMMON_OPTIONS = ("positions", "budget", "video_budget", "backend")


@dataclass(frozen=True)
class Option:
    """One method option: its default, a checker that returns the normalised value or raises,
    and a one-line description for docs and error messages."""

    default: Any
    check: Callable[[str, Any], Any]
    doc: str = ""


# -- checkers: each takes (name, value) and returns the normalised value --------------------


def is_number(value: Any) -> bool:
    """True for real numbers; `bool` is not a number here."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def choice(*allowed: Any) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")
        return value

    return check


def integer(minimum: int | None = None) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name}={value!r} must be an int")
        if minimum is not None and value < minimum:
            raise ValueError(f"{name}={value!r} must be >= {minimum}")
        return int(value)

    return check


def optional_int_list(name: str, value: Any) -> tuple[int, ...] | None:
    """None, one int, or a non-empty list/tuple of distinct ints (layer indices, negative allowed)."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),)
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
            if len(set(value)) != len(value):
                raise ValueError(f"{name}={value!r} lists a layer twice")
            return tuple(int(v) for v in value)
    raise TypeError(f"{name}={value!r} must be None, an int or a non-empty list of ints")


# -- keep --------------------------------------------------------------------------------


def check_keep(keep: Any) -> int | float:
    """`keep` int = visual tokens kept per image (>= 1); float in (0, 1] = fraction kept."""
    if not is_number(keep):
        raise TypeError(
            f"keep={keep!r} ({type(keep).__name__}) must be an int (tokens kept per image) "
            "or a float in (0, 1] (fraction kept); bool is not allowed"
        )
    if isinstance(keep, numbers.Integral):
        if keep <= 0:
            raise ValueError(f"keep={keep!r} must be >= 1 when an int (tokens kept per image)")
        return int(keep)
    keep = float(keep)
    if math.isnan(keep) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep!r} must be in (0, 1] when a float (fraction of tokens kept)")
    return keep


def split_budget(total: int, sizes: list[int]) -> list[int]:
    """Splits `total` kept tokens over regions of `sizes` tokens, proportionally (largest
    remainder; ties go to the earlier region). Each share is at most its region's size."""
    if len(sizes) == 1:  # the common case (one region per image), without the sort
        return [min(max(total, 0), sizes[0])]
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    # in integers: equal remainders are exact ties (float shares broke them by rounding error)
    shares = [total * n // whole for n in sizes]
    remainders = [total * n % whole for n in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-remainders[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return [min(s, n) for s, n in zip(shares, sizes)]


def tokens_to_keep(keep: int | float, n_tokens: int, rounding: str = "nearest") -> int:
    """Budget for one image of `n_tokens` visual tokens.

    An int keeps that many (clamped to the tokens there are); a float keeps
    round(keep * n_tokens) (rounding="floor": floor(keep * n_tokens), as vLLM's EVS counts), at
    least one. keep=1 keeps one token, keep=1.0 keeps all.
    """
    if n_tokens <= 0:
        return 0
    if isinstance(keep, int):
        return min(keep, n_tokens)
    share = keep * n_tokens if rounding == "floor" else keep * n_tokens + 0.5
    return min(n_tokens, max(1, math.floor(share)))


# -- the config --------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneConfig:
    """A validated pruning configuration.

    Args:
        method: a name from `vlm_prune.available_methods()`.
        keep: int = visual tokens kept per image; float in (0, 1] = fraction kept.
        positions: "renumber" (kept tokens numbered consecutively) or "original" (kept tokens
            keep their position ids); None = the model family's default.
        budget: "per_image" (`keep` counts an image's tokens; split over its crops in proportion
            to their size), "per_crop" (`keep` applies to the base image and to each crop) or
            "pooled" (`keep` counts the image's tokens, which compete as one pool: base image,
            crops and row-end newline tokens together); only LLaVA-NeXT images have crops.
            None = the method's default (its release's: FasterVLM and VisionZip per crop,
            DivPrune pooled, the others per image).
        video_budget: how a video's tokens are budgeted (Qwen-VL families): "per_frame" (each
            frame keeps `keep` tokens, or that fraction of its tokens, chosen within the frame)
            or "per_video" (the video keeps `keep` tokens, or that fraction of all its tokens,
            chosen in one pool over its frames: for methods that make no coarser grid). None =
            the method's default ("per_video" for `evs`, else "per_frame").
        backend: "auto" (Triton on CUDA when available, else PyTorch), "torch" or "triton".
        options: method options; unknown names are rejected, missing ones take defaults.
    """

    method: str
    keep: int | float
    positions: str | None = None
    budget: str | None = None
    backend: str = "auto"
    options: Mapping[str, Any] = field(default_factory=dict)
    video_budget: str | None = None

    def __post_init__(self) -> None:
        from .registry import get_method  # late: the registry imports the methods

        if not isinstance(self.method, str):
            raise TypeError(f"method={self.method!r} must be a str")
        method_cls = get_method(self.method)
        object.__setattr__(self, "keep", check_keep(self.keep))
        if self.positions is not None and self.positions not in POSITION_POLICIES:
            raise ValueError(
                f"positions={self.positions!r} is not allowed; choose one of {list(POSITION_POLICIES)}"
            )
        if self.positions is not None and method_cls.stage != "vision":
            allowed = getattr(method_cls, "position_policies", ())
            if self.positions not in allowed:
                raise ValueError(
                    f"positions={self.positions!r} is not an option of {self.method!r}, which prunes inside the LLM: "
                    + (f"choose one of {list(allowed)}" if allowed else
                       f"{getattr(method_cls, 'position_note', 'it keeps original positions')} (leave positions unset)")
                )
        if self.budget is not None and self.budget not in BUDGET_POLICIES:
            raise ValueError(f"budget={self.budget!r} is not allowed; choose one of {list(BUDGET_POLICIES)}")
        if self.budget == "pooled" and method_cls.stage == "vision":
            if method_cls.output_is_grid:
                raise ValueError(f"budget='pooled' puts an image's tokens in one pool without a grid; method "
                                 f"{self.method!r} makes a coarser grid: use budget='per_image' or 'per_crop'")
            if method_cls.needs & {"cls_attention", "keys"}:
                raise ValueError(f"budget='pooled' pools LLaVA-NeXT's image_newline tokens too, which have no "
                                 f"vision-tower signal for {self.method!r} to score; use budget='per_image' or "
                                 "'per_crop'")
        if self.budget not in (None, "pooled") and method_cls.stage != "vision":
            raise ValueError(f"budget={self.budget!r} is not available for {self.method!r}, which prunes inside the "
                             "LLM: each image's tokens are one pool there (budget='pooled', the default)")
        self._check_video_budget(method_cls)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not allowed; choose one of {list(BACKENDS)}")
        if self.backend == "triton":
            from vlm_prune.kernels.dispatch import triton_available

            if not triton_available():
                raise ValueError("backend='triton' needs Triton installed (pip install triton); use 'auto' or 'torch'")
        object.__setattr__(self, "options", method_cls.validate_options(dict(self.options)))

    def _check_video_budget(self, method_cls: Any) -> None:
        if self.video_budget is None:
            return
        if self.video_budget not in VIDEO_BUDGET_POLICIES:
            raise ValueError(f"video_budget={self.video_budget!r} is not allowed; choose one of "
                             f"{list(VIDEO_BUDGET_POLICIES)}")
        if method_cls.stage != "vision":
            raise ValueError(f"video_budget={self.video_budget!r} is not available for {self.method!r}, which prunes "
                             "inside the LLM (videos pass through it unpruned)")
        if self.video_budget == "per_video" and method_cls.output_is_grid:
            raise ValueError(f"video_budget='per_video' puts a video's frames in one pool without a 2D grid; method "
                             f"{self.method!r} makes a coarser grid of each frame: use video_budget='per_frame'")
        if self.video_budget == "per_frame" and method_cls.video_budgets == ("per_video",):
            raise ValueError(f"method {self.method!r} compares each frame with the one before: it needs "
                             "video_budget='per_video'")

    @property
    def video_policy(self) -> str:
        """The video budget policy in force: the given one, else the method's default."""
        from .registry import get_method

        return self.video_budget or getattr(get_method(self.method), "video_budgets", ("per_frame",))[0]

    @classmethod
    def from_kwargs(cls, method: str, keep: int | float, **options: Any) -> "PruneConfig":
        """`PruneConfig.from_kwargs("cls_attention", 64, positions="original", layers=[-2])`."""
        common = {k: options.pop(k) for k in COMMON_OPTIONS if k in options}
        return cls(method=method, keep=keep, options=options, **common)

    def as_kwargs(self) -> dict[str, Any]:
        """The arguments of `vlm_prune.patch` that rebuild this config."""
        return dict(method=self.method, keep=self.keep, positions=self.positions,
                    budget=self.budget, video_budget=self.video_budget, backend=self.backend, **self.options)

    def budget_for(self, n_tokens: int) -> int:
        """Visual tokens kept for one image of `n_tokens` tokens (the method's rounding)."""
        from .registry import get_method

        return tokens_to_keep(self.keep, n_tokens, getattr(get_method(self.method), "budget_rounding", "nearest"))
