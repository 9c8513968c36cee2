"""`transition`: TransPrune -- token transition variation (TTV) + instruction-guided attention (IGA).

For each attention and FFN sub-module s of a decoder layer, with T_in its normed input and T_out
its output before the residual add, per visual token:
    m = ||T_out|| / ||T_in||,   d = 1 - cos(T_out, T_in)      ("signed", the released code)
                                d = 1 - |cos(T_out, T_in)|    ("abs", the paper)
    TTV_s = softmax over the row's visual tokens (d) * m,   TTV_layer = TTV_attn + TTV_ffn.
TTV is summed over a window of layers: from the first pruning layer up to each pruning layer
(the released script's window is layers 7-12 with pruning after 7, 9 and 12).
IGA: attention of the instruction tokens (the prompt's text after its last image) to each
visual token at the pruning layer, averaged over heads and instruction tokens; only those rows
are computed, from the layer's own q/k with RoPE.
Score = alpha * TTV + (1 - alpha) * IGA, each normalised to sum 1 over the row's visual tokens.

Schedule: the released TransPrune-High one -- prune after layers 7, 9 and 12 of 32 keeping
87.5%, 62.5% and 12.5% -- scaled to the model depth (layer l of 32 -> round(l * depth / 32),
clamped to [1, depth - 1]; stages landing on one layer merge into the later one). `keep` is the
final budget; the earlier stages keep max(their share, the final budget). `schedule=` sets
explicit (after_layer, keep) stages.
"""

from __future__ import annotations

from ..config import Option, choice, tokens_to_keep
from ..registry import register_method
from .llm_base import LLMMethod, Stage, check_schedule, normalise, resolve_stages

RELEASED_LAYERS_OF_32 = (7, 9, 12)
RELEASED_KEEP = (0.875, 0.625)  # the last stage keeps `keep` (released: 0.125)


def _check_alpha(name, value):
    from ..config import is_number

    if not is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
    return float(value)


def scaled_layers(depth: int) -> list[int]:
    layers = [min(depth - 1, max(1, round(layer * depth / 32))) for layer in RELEASED_LAYERS_OF_32]
    return layers


@register_method
class Transition(LLMMethod):
    name = "transition"
    needs = frozenset({"transition", "attention"})
    attention_rows = "instruction"
    paper = "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model (2025)"
    options = {
        "alpha": Option(0.5, _check_alpha, "weight of TTV against IGA; 1.0 = TTV alone (attention-free)"),
        "direction": Option("signed", choice("signed", "abs"), "'signed': 1 - cos (released code); 'abs': 1 - |cos| (paper)"),
        "schedule": Option(None, check_schedule, "explicit [(after_layer, keep), ...] stages; None = released schedule scaled to the depth"),
    }

    def stages(self, options, keep, n_layers):
        if n_layers < 2:
            raise ValueError(f"transition needs a decoder of at least 2 layers, this one has {n_layers}")
        if options["schedule"] is not None:
            return resolve_stages(options["schedule"], keep, n_layers, "schedule")
        keeps = list(RELEASED_KEEP) + [keep]
        stages: dict[int, int | float] = {}
        for layer, stage_keep in zip(scaled_layers(n_layers), keeps):
            stages[layer] = stage_keep  # a later stage on the same layer wins
        return [Stage(layer, k) for layer, k in stages.items()]

    def transition_layers(self, options, stages):
        return set(range(stages[0].after_layer, stages[-1].after_layer + 1))

    def query_rows(self, options):
        return None if options["alpha"] == 1.0 else "instruction"

    def score(self, signals, visual, options):
        alpha = options["alpha"]
        score = alpha * normalise(signals["transition"], visual)
        if alpha < 1.0:
            score = score + (1 - alpha) * normalise(signals["attention"], visual)
        return score


def stage_budget(stage_keep: int | float, final_keep: int | float, n_tokens: int) -> int:
    """Tokens an image of n_tokens keeps at a stage: never fewer than the final budget."""
    return max(tokens_to_keep(stage_keep, n_tokens), tokens_to_keep(final_keep, n_tokens))
