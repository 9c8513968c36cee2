"""`fastv`: FastV -- after decoder layer K, keep the visual tokens the last token attends to most.

At layer K (1-indexed; default 2, FastV's K=2) the attention of the prompt's last token to each
visual token (heads averaged) is computed from that layer's own q/k with RoPE -- one row, so
SDPA stays on -- and only the top `keep` visual tokens per image go on to layers K+1.. .
`query="instruction"` averages the rows of all instruction tokens (the text after the image)
instead. Original position ids are kept; decode uses the pruned cache of each layer.
"""

from __future__ import annotations

from ..config import Option, choice, integer
from ..registry import register_method
from .llm_base import LLMMethod, Stage


@register_method
class FastV(LLMMethod):
    name = "fastv"
    needs = frozenset({"attention"})
    attention_rows = "last"
    paper = "FastV (arXiv 2403.06764)"
    position_note = "kept tokens keep their original position ids, as in FastV's release"
    options = {
        "layer": Option(2, integer(1), "K: tokens are dropped after this many decoder layers"),
        "query": Option("last", choice("last", "instruction"), "rows whose attention scores the tokens"),
    }

    def stages(self, options, keep, n_layers):
        layer = options["layer"]
        if not 1 <= layer < n_layers:
            raise ValueError(f"layer={layer} is outside [1, {n_layers - 1}] for a decoder of {n_layers} layers")
        return [Stage(layer, keep)]

    def query_rows(self, options):
        return options["query"]

    def score(self, signals, visual, options):
        return signals["attention"]
