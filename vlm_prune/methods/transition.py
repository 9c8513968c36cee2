"""`transition`: TransPrune -- token transition variation (TTV) + instruction-guided attention (IGA).

The default follows the released code: github liaolea/TransPrune @
c9e8284f5808f7692c40590ffc99537e9220a01d, llava/model/modeling_llama_transprune.py --
`LlamaDecoderLayer_TransPrune.forward` and `compute_transf_weight` (TTV),
`LlamaModel.transprune_forward` (schedule, TTV accumulation, decode positions) and
`LlamaModel.transprune_rank_drop` (IGA, score, budgets, renumbered positions); the schedule is
the one of its scripts/transprune/v1_5_test and v1_6_test (LLaVA-1.5-7B, LLaVA-1.6-7B).

Released rules, as implemented here (layers 1-indexed: "after layer l" = l layers have run):
- TTV of a decoder layer: for its attention and its FFN, with T_in the sub-module's normed input
  and T_out its output before the residual add, per token
      m = ||T_out|| / ||T_in||,  d = 1 - cos(T_in, T_out)  (signed cos; the paper writes 1 - |cos|),
      TTV_sub = m * softmax(d), the softmax over the WHOLE current sequence (text included);
  TTV_layer = TTV_attn + TTV_ffn. Layers from the first pruning layer to the last one (released:
  7..12) each store theirs; a stage sums the stored layers at its visual tokens (a layer's values
  follow the tokens that survive earlier stages): the stage after layer 7 reads layer 7, the one
  after 9 reads layers 7-9, the one after 12 reads 7-12.
- IGA of a stage after layer l: the decoder layer l+1 -- the first layer that will see the
  pruned sequence -- applied to layer l's output: its input_layernorm, q_proj and k_proj, RoPE at
  the current position ids; rows = every token after the image to the end of the prompt (last
  token included); softmax over all keys (causal, fp32), mean over heads (grouped keys repeated
  over their query heads), image columns, mean over the rows.
- Score = TTV / sum(TTV) + IGA / sum(IGA) over the image's visual tokens still present
  (released: divided by sum + 1e-8; `alpha` = 0.5 weighs them equally, the same ranking); the
  top tokens stay, in their original order.
- Budgets: the released schedule prunes after layers 7, 9 and 12 of 32 keeping int(N * 0.875),
  int(N * 0.625) and int(N * 0.125) of an image's N tokens (576 -> 504 -> 360 -> 72); here the
  layers scale to the depth (layer l of 32 -> round(l * depth / 32), clamped to
  [1, depth - 1]; stages landing on one layer merge into the later one), the fractional stages
  before the last keep int(N * ratio) (at least 1), and the last stage keeps `keep`: an int =
  that many tokens; a float = round(keep * N) (at least 1) -- the rounding every method of
  vlm_prune uses for a fractional `keep`, so methods compared at one `keep` keep the same count;
  it equals the release's int(N * keep) whenever N * keep is whole (576 x 0.125 = 72) and keeps
  one token more when its fraction is >= .5 (pass an int `keep` for an exact count). A stage
  never keeps fewer than the final budget.
- Positions: after every stage the sequence is renumbered (prefill: the shortened sequence is
  numbered 0..L'-1; decode: each stage's layers see the position minus the tokens it and the
  earlier stages dropped), so a token at a layer of stage s sits at its original position minus
  the tokens stages <= s dropped before it (the layers get the rotary embedding of those ids
  from the language model's own `rotary_emb`). The same holds per row in a left-padded batch
  (a row's positions are the ones the model gives it, minus its drops), for decode with a
  dynamic or static cache, for generate(use_cache=False), and for a later chat turn with a new
  image on a reused cache (minus every token stage s dropped before, cached turns included).
- LLaVA-NeXT: an image's whole anyres span (base, unpadded crops and image_newline tokens) is
  one pool ranked with the same ratios; the newline placeholders are candidates like the rest.
- Batched rows: the release runs batch size 1. Here every row is pruned as it would be alone:
  each TTV softmax runs over the row's real tokens (padding excluded) and each image keeps its
  own budget.

Options (default = the release):
- positions: "renumber" (default on LLaVA-1.5 / LLaVA-NeXT) | "original" (kept tokens keep their
  position ids; the only policy, and the default, on Qwen2-VL / Qwen2.5-VL, whose M-RoPE
  positions are 3-D: positions="renumber" there is refused when patching).
- iga_layer: "next" (default) | "own": IGA from the last layer before the stage, its own q/k on
  its input (FastV's way; vlm_prune's transition before it followed the release).
- ttv_softmax: "sequence" (default) | "visual": the TTV softmax over the row's visual tokens
  still present only (vlm_prune's transition before it followed the release).
  positions="original", iga_layer="own", ttv_softmax="visual" together give that earlier
  behaviour back; its budgets were round(N * keep) per stage instead of int().
- direction: "signed" (default, 1 - cos) | "abs" (1 - |cos|, the paper).
- alpha: weight of TTV against IGA (0.5 default); 1.0 = TTV alone (attention-free).
- schedule: explicit [(after_layer, keep), ...] stages (the last keep None or = `keep`);
  fractional keeps before the last follow the release's int(N * keep).
Continuing a cache with a new image (a later chat turn; the release has no such path): the
TTV softmax runs over the new turn's tokens (the cached tokens' transitions are not kept), and
the new instruction rows also attend to the keys the scoring layer's cache holds (for
iga_layer="next": the earlier turns' tokens that layer kept, at the positions they were stored
with). A softmax over the whole sequence also weighs a token by the tokens after it, so a
conversation pruned turn by turn need not keep what one prefill of the whole conversation
would.
"""

from __future__ import annotations

from ..config import Option, choice, tokens_to_keep
from ..registry import register_method
from .llm_base import LLMMethod, check_depth, check_schedule, floor_budget, normalise, resolve_stages, scaled_stages

RELEASED_LAYERS_OF_32 = (7, 9, 12)
RELEASED_KEEP = (0.875, 0.625)  # the last stage keeps `keep` (released: 0.125)


def _check_alpha(name, value):
    from ..config import is_number

    if not is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
    return float(value)


@register_method
class Transition(LLMMethod):
    name = "transition"
    needs = frozenset({"transition", "attention"})
    attention_rows = "instruction"
    paper = "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model (2025)"
    release = ("github liaolea/TransPrune @ c9e8284f5808f7692c40590ffc99537e9220a01d, "
               "llava/model/modeling_llama_transprune.py (transprune_forward, transprune_rank_drop)")
    position_policies = ("renumber", "original")
    options = {
        "alpha": Option(0.5, _check_alpha, "weight of TTV against IGA; 1.0 = TTV alone (attention-free)"),
        "direction": Option("signed", choice("signed", "abs"), "'signed': 1 - cos (released code); 'abs': 1 - |cos| (paper)"),
        "schedule": Option(None, check_schedule, "explicit [(after_layer, keep), ...] stages; None = released schedule scaled to the depth"),
        "iga_layer": Option("next", choice("next", "own"),
                            "'next': IGA from the stage's first layer on the unpruned sequence (release); "
                            "'own': from the last layer before the stage"),
        "ttv_softmax": Option("sequence", choice("sequence", "visual"),
                              "'sequence': TTV softmax over the row's whole sequence (release); 'visual': over its visual tokens"),
    }

    def stages(self, options, keep, n_layers):
        if options["schedule"] is not None:
            check_depth(n_layers, self.name)
            return resolve_stages(options["schedule"], keep, n_layers, "schedule")
        return scaled_stages(RELEASED_LAYERS_OF_32, list(RELEASED_KEEP) + [keep], n_layers, self.name)

    def transition_layers(self, options, stages):
        return set(range(stages[0].after_layer, stages[-1].after_layer + 1))

    def transition_domain(self, options):
        return options["ttv_softmax"]

    def query_rows(self, options):
        return None if options["alpha"] == 1.0 else "instruction"

    def attention_layer(self, options):
        return options["iga_layer"]

    def default_positions(self, options, sequential):
        return "renumber" if sequential else "original"

    def budget(self, s, stages, final_keep, n_tokens):
        """Stages before the last keep the release's int(N * keep) (at least 1); the last keeps
        `keep` (see the module docstring); none fewer than the last."""
        final = tokens_to_keep(final_keep, n_tokens)
        if s == len(stages) - 1:
            return final
        return max(floor_budget(stages[s].keep, n_tokens), final)

    def score(self, signals, visual, options):
        alpha = options["alpha"]
        score = alpha * normalise(signals["transition"], visual)
        if alpha < 1.0:
            score = score + (1 - alpha) * normalise(signals["attention"], visual)
        return score
