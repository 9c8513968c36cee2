"""Methods that drop visual tokens inside the LLM decoder, progressively (stage "llm").

A method declares its stages -- after which decoder layers tokens are dropped and how many stay
-- and how to score the visual tokens still present at each stage from the signals the engine
(vlm_prune.patches.in_llm) gathers while the prefill runs:
  "transition": [B, L] token transition variation accumulated over the method's window;
  "attention":  [B, L] attention the method's query rows pay each token, averaged over heads
                and rows (rows: the instruction, the last token, or "visual": each image's own
                tokens, a column averaged over its image's rows), computed on the sequence
                the stage prunes: by the last layer before the stage (`attention_layer` "own",
                FastV) or by the stage's first layer applied to that sequence ("next",
                TransPrune's release).
  "keys":       [B, L, Dh] the scoring layer's keys (RoPE applied), averaged over key heads
                (methods that merge: `contextual`).
A method may also merge: at a stage, `contextual(...)` of an image's kept tokens are not
selected by score but are targets that absorb the tokens dropped around them (`merge`).
The engine also asks a method which tokens each TTV softmax runs over (`transition_domain`),
which position ids the layers after a stage use (`position_policies`, `default_positions`) and
how many tokens each stage keeps (`budget`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..config import tokens_to_keep
from .base import Method


@dataclass(frozen=True)
class Stage:
    """Drop visual tokens after decoder layer `after_layer` (1-indexed: that many layers ran on
    the previous stage's tokens), keeping `keep` per image (int tokens, or a fraction of the
    image's tokens before any pruning)."""

    after_layer: int
    keep: int | float


def check_schedule(name: str, value: Any) -> tuple[tuple[int, int | float | None], ...] | None:
    """None, or a list of (after_layer, keep) pairs; the last keep may be None (= the final budget)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{name}={value!r} must be a non-empty list of (after_layer, keep) pairs")
    stages = []
    for i, stage in enumerate(value):
        if not isinstance(stage, (list, tuple)) or len(stage) != 2:
            raise TypeError(f"{name}[{i}]={stage!r} must be an (after_layer, keep) pair")
        layer, keep = stage
        if not isinstance(layer, numbers.Integral) or isinstance(layer, bool) or layer < 1:
            raise ValueError(f"{name}[{i}]: after_layer={layer!r} must be an int >= 1")
        if keep is None and i == len(value) - 1:
            stages.append((int(layer), None))
            continue
        from ..config import check_keep

        try:
            keep = check_keep(keep)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{name}[{i}]: {error}") from None
        stages.append((int(layer), keep))
    layers = [layer for layer, _ in stages]
    if layers != sorted(set(layers)):
        raise ValueError(f"{name}={value!r}: after_layer values must be strictly increasing")
    return tuple(stages)


def resolve_stages(
    schedule: tuple[tuple[int, int | float | None], ...], keep: int | float, n_layers: int, name: str
) -> list[Stage]:
    """Explicit stages against the model depth; the last stage keeps the final budget `keep`."""
    stages = []
    for i, (layer, stage_keep) in enumerate(schedule):
        last = i == len(schedule) - 1
        if not 1 <= layer < n_layers:
            raise ValueError(
                f"{name}: after_layer={layer} is outside [1, {n_layers - 1}] for a decoder of {n_layers} layers"
            )
        if last and stage_keep is not None and stage_keep != keep:
            raise ValueError(
                f"{name}: the last stage keeps {stage_keep!r} but keep={keep!r}; the final stage keeps "
                "`keep` (write None in the last pair, or make them equal)"
            )
        stages.append(Stage(layer, keep if last else stage_keep))
    return stages


class LLMMethod(Method):
    stage: ClassVar[str] = "llm"
    # which rows' attention the "attention" signal needs: "instruction" or "last"; None = none
    attention_rows: ClassVar[str | None] = None
    # the `positions=` values the method accepts (() = none: the layers after a stage keep the
    # tokens' original position ids), and what PruneConfig says when refusing one
    position_policies: ClassVar[tuple[str, ...]] = ()
    position_note: ClassVar[str] = "the layers after a stage keep the tokens' original position ids"

    def stages(self, options: Mapping[str, Any], keep: int | float, n_layers: int) -> list[Stage]:
        raise NotImplementedError

    def transition_layers(self, options: Mapping[str, Any], stages: list[Stage]) -> set[int]:
        """1-indexed decoder layers whose sub-modules' transitions feed the "transition" signal."""
        return set()

    def transition_domain(self, options: Mapping[str, Any]) -> str:
        """The tokens each sub-module's TTV softmax runs over: "visual" (the row's visual tokens
        present at that layer) or "sequence" (every real token of the row present there)."""
        return "visual"

    def query_rows(self, options: Mapping[str, Any]) -> str | None:
        return self.attention_rows

    def attention_layer(self, options: Mapping[str, Any]) -> str:
        """Which layer's q/k give the "attention" signal of a stage: "own" (the last layer
        before the stage, on its input) or "next" (the stage's first layer, on the sequence
        it would see unpruned)."""
        return "own"

    def default_positions(self, options: Mapping[str, Any], sequential: bool) -> str:
        """The position policy when `positions=` is not given; `sequential`: the family numbers
        its tokens with 1-D positions (LLaVA), not M-RoPE's 3-D ones (Qwen-VL)."""
        return "original"

    def budget(self, s: int, stages: list[Stage], final_keep: int | float, n_tokens: int) -> int:
        """Tokens an image of `n_tokens` (before any pruning) keeps at stage `s`: the stage's
        `keep` rounded as `keep` is everywhere (`tokens_to_keep`), never fewer than the final
        budget."""
        return max(tokens_to_keep(stages[s].keep, n_tokens), tokens_to_keep(final_keep, n_tokens))

    def score(self, signals: Mapping[str, torch.Tensor], visual: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
        """signals [B, L] -> scores [B, L] (only visual positions are read; higher = keep)."""
        raise NotImplementedError

    def contextual(self, s: int, stages: list[Stage], budget: int, options: Mapping[str, Any]) -> int:
        """Of an image's `budget` tokens at stage s, how many are merged targets (0: selection only)."""
        return 0

    def merge(self, keys: torch.Tensor, candidates: torch.Tensor, n_targets: int,
              options: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image's contextual tokens: keys [N, Dk] of its tokens present, candidates [R]
        (slots of those not kept by score, increasing). Returns (targets [C], joiners [J] slots,
        group [J] in 0..C-1): each target's state becomes its own + the mean of its joiners'."""
        raise NotImplementedError


def check_depth(n_layers: int, method: str) -> None:
    """A progressive in-LLM method drops tokens between layers: it needs at least two."""
    if n_layers < 2:
        raise ValueError(f"{method} needs a decoder of at least 2 layers, this one has {n_layers}")


def scaled_stages(layers_of_32: tuple[int, ...], keeps: list, n_layers: int, method: str) -> list[Stage]:
    """A release's stages on a 32-layer decoder, scaled to `n_layers`: layer l -> round(l * depth
    / 32) clamped to [1, depth - 1]; stages landing on one layer merge into the later one."""
    check_depth(n_layers, method)
    stages: dict[int, Any] = {}
    for layer, keep in zip(layers_of_32, keeps):
        stages[min(n_layers - 1, max(1, round(layer * n_layers / 32)))] = keep  # a later stage wins
    return [Stage(layer, keep) for layer, keep in stages.items()]


def floor_budget(keep: int | float, n_tokens: int) -> int:
    """int(n_tokens * keep) for a fraction (at least 1, as released progressive schedules
    count a stage's share), `keep` itself (clamped to the tokens there are) for an int."""
    if n_tokens <= 0:
        return 0
    if isinstance(keep, int):
        return min(keep, n_tokens)
    return min(n_tokens, max(1, math.floor(keep * n_tokens)))


def normalise(values: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Scales each row so its visual entries sum to 1 (rows summing to 0 stay 0)."""
    masked = torch.where(visual, values.float(), 0.0)
    total = masked.sum(-1, keepdim=True)
    return torch.where(total > 0, masked / total.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
