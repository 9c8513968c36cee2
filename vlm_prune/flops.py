"""Theoretical prefill FLOPs of a decoder-only LLM (Llama / Qwen2 layout), layer by layer.

Conventions: one multiply-add = 2 FLOPs; attention scores and the weighted sum are counted over
the whole n x n matrix a dense kernel computes; norms, rotary and softmax are ignored (< 1%).
Per layer with n tokens, hidden d, h query heads and g key/value heads of size e, MLP width m:
    projections  2 * n * d * e * (2h + 2g)        (q, o: h heads; k, v: g heads)
    attention    2 * 2 * n * n * h * e             (q.K^T and A.V)
    MLP          2 * n * 3 * d * m                 (gate, up, down)
The LM head adds 2 * d * vocab per token whose logits are computed (generate: the last one).

A configuration's per-layer lengths: `handle.layer_lengths` of its last prefill (every stage of a
pipeline counted: the vision stages shorten every layer's sequence, an in-LLM stage the layers
after it), or `stage_lengths` with one (after_layer, visual tokens kept) pair per stage --
after_layer 0 for a vision stage. The vision tower is not counted (pruning runs all of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class PrefillFlops:
    per_layer: list[float]  # FLOPs of each decoder layer
    lm_head: float
    sequence_lengths: list[int]  # tokens each layer processed

    @property
    def total(self) -> float:
        return sum(self.per_layer) + self.lm_head

    def ratio_to(self, other: "PrefillFlops") -> float:
        """self.total / other.total (e.g. unpruned / pruned = theoretical speed-up)."""
        return self.total / other.total


def _dims(text_config: Any) -> tuple[int, int, int, int, int, int]:
    d = text_config.hidden_size
    h = text_config.num_attention_heads
    g = getattr(text_config, "num_key_value_heads", None) or h
    e = getattr(text_config, "head_dim", None) or d // h
    return d, h, g, e, text_config.intermediate_size, text_config.vocab_size


def decoder_layer_flops(text_config: Any, n_tokens: int) -> float:
    d, h, g, e, m, _ = _dims(text_config)
    projections = 2 * n_tokens * d * e * (2 * h + 2 * g)
    attention = 4 * n_tokens * n_tokens * h * e
    mlp = 6 * n_tokens * d * m
    return float(projections + attention + mlp)


def prefill_flops(
    text_config: Any, sequence_lengths: int | Sequence[int], logits_tokens: int = 1
) -> PrefillFlops:
    """FLOPs of one prefill.

    sequence_lengths: one int (every layer sees the same length: no pruning, or pruning before
    the LLM) or one length per decoder layer (pruning inside the LLM).
    """
    n_layers = text_config.num_hidden_layers
    if isinstance(sequence_lengths, int):
        lengths = [sequence_lengths] * n_layers
    else:
        lengths = [int(n) for n in sequence_lengths]
        if len(lengths) != n_layers:
            raise ValueError(f"{len(lengths)} sequence lengths for a model of {n_layers} layers")
    d, *_, vocab = _dims(text_config)
    return PrefillFlops(
        per_layer=[decoder_layer_flops(text_config, n) for n in lengths],
        lm_head=float(2 * d * vocab * logits_tokens),
        sequence_lengths=lengths,
    )


def stage_lengths(n_layers: int, text_tokens: int, visual_tokens: int,
                  stages: Sequence[tuple[int, int]] = ()) -> list[int]:
    """Sequence length each decoder layer processes when visual tokens are dropped.

    stages: (after_layer, visual tokens kept) pairs in order, after_layer 1-indexed (layers after
    it see the kept count); after_layer 0 drops them before the first layer (a vision stage), so
    a pipeline "cls_attention+divprune+fastv" with keep (288, 144, 64), fastv after layer 2, is
    [(0, 288), (0, 144), (2, 64)]. With no stages every layer sees text_tokens + visual_tokens.
    """
    lengths = []
    for layer in range(1, n_layers + 1):
        kept = visual_tokens
        for after_layer, stage_kept in stages:
            if layer > after_layer:
                kept = stage_kept
        lengths.append(text_tokens + kept)
    return lengths
