"""`visiondrop`: VisionDrop -- visual-only scores, dominant tokens + contextual merging, in stages.

The default follows the released code: github Ruixxxx/VisionDrop @
f7a944497d581aa79570f8f79e8ca91b5347a52f -- llava/visionzip/clip_encoder.py (the vision-encoder
stage), llava/model/modeling_llama_visiondrop.py (`visiondrop_forward`: the LLM stages and their
decode positions; `visiondrop_rank_drop`: scores, dominant selection, contextual merging) and
llava/eval_visiondrop/model_vqa_loader.py + scripts/v1_5/visiondrop_eval (the settings:
`--dominant 42 --contextual 6 --layer_list [8,16,24] --image_token_list [[30,5],[22,4],[16,3]]`,
LLaVA-1.5-7B, "an average of 32 tokens").

Released rules, as implemented here (layers 1-indexed: "after layer l" = l layers have run):
- vision-encoder stage: VisionZip's stage (vlm_prune's `visionzip`, its release defaults) with
  42 dominant tokens ([CLS] included) + 6 contextual ones = 48 per image;
- LLM stages after layers 8, 16 and 24 of 32 keep 30 + 5, 22 + 4 and 16 + 3 (dominant +
  contextual) of the 48 tokens that enter the LLM;
- the scores of a stage after layer l: the decoder layer l+1 applied to layer l's output (its
  input_layernorm, q_proj, k_proj, RoPE at the current positions); query rows = the image's own
  tokens (visual-to-visual, no text), causal softmax over every key in fp32, mean over heads,
  the image's columns, mean over the rows;
- the top `dominant` tokens by score stay; the others (in order) are candidates: every step-th
  is a target (step = max(1, R // C), the first C), every other candidate joins the target whose
  key (that layer's keys after RoPE, averaged over key heads, L2-normalised) is most similar; a
  contextual token = the target's hidden state + the mean of those that joined it -- the same
  merging rule as VisionZip's, on the LLM's hidden states (`visionzip.assign_to_targets`);
- after each stage the sequence is renumbered (position ids 0..L'-1; decode: minus the tokens
  the stages dropped).

Budgets here: `keep` = the tokens per image after the last LLM stage (as for every in-LLM method;
the release's 19 = 16 + 3). Patched alone, visiondrop runs the release's two parts: VisionZip to
round(keep * 48 / 19) tokens per image (an eighth of them contextual, the release's 6 of 48),
then the LLM stages keeping floor(N * 35 / 48) and floor(N * 26 / 48) of the N tokens that reach
the LLM, then `keep` (never fewer); keep=19 is the release exactly (48 -> 35 -> 26 -> 19, an
average of 32 over 32 layers). A float keep is a fraction of the image's tokens (VisionZip keeps
keep * 48 / 19 of them, the last LLM stage 19 / 48 of what reaches it). Each stage's contextual
count is the release's share of it: round(b * 5 / 35), round(b * 4 / 26), round(b * 3 / 19). The
layers scale to the depth (layer l of 32 -> round(l * depth / 32) in [1, depth - 1]; stages on one
layer merge into the later one), as `transition`'s do.

Departure forced by the engine (documented, not an option): the kept tokens stay in their
sequence order, a contextual token at its target's place; the release puts the dominant tokens
first and the contextual ones after them. The in-LLM engine's layers see slices of the model's
own sequence (causal masks, caches and decode positions are the model's, sliced), which needs
the kept columns in their order. Under renumbered positions this changes which position a
contextual token gets, not which tokens stay or what they hold.

Options (default = the release):
- vision_stage: None (default: the VisionZip stage when visiondrop is patched alone; in a
  pipeline the stage before it is the vision stage) | False (the LLM stages only: `keep` then
  counts the tokens that reach the LLM).
- schedule: explicit [(after_layer, keep), ...] LLM stages (the last keep None or = `keep`).
- contextual: None (the release's shares; 0.15 of each stage of an explicit schedule) | a
  fraction in [0, 1) of every stage's tokens.
- positions: "renumber" (default on LLaVA) | "original" (the only policy on Qwen-VL's M-RoPE).
Batched rows: each image is scored by its own rows and keeps its own budget, as alone.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from ..config import Option, PruneConfig, is_number
from ..registry import register_method
from .llm_base import LLMMethod, check_depth, check_schedule, floor_budget, resolve_stages, scaled_stages
from .visionzip import assign_to_targets

RELEASED_LAYERS_OF_32 = (8, 16, 24)
ENTERING = 48  # tokens per image the release's LLM receives (42 dominant + 6 contextual)
RELEASED_COUNTS = (35, 26, 19)  # after each LLM stage (30 + 5, 22 + 4, 16 + 3)
RELEASED_CONTEXTUAL = (5, 4, 3)
VISION_CONTEXTUAL = Fraction(6, ENTERING)
EXPLICIT_CONTEXTUAL = 0.15


def _check_contextual(name, value):
    if value is None:
        return None
    if not is_number(value) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}={value!r} must be None or a fraction in [0, 1)")
    return float(value)


def _check_vision_stage(name, value):
    if value not in (None, True, False):
        raise ValueError(f"{name}={value!r} must be None (automatic), True or False")
    return value


def _round(x) -> int:
    return int(Fraction(x) + Fraction(1, 2)) if x >= 0 else 0


@register_method
class VisionDrop(LLMMethod):
    name = "visiondrop"
    needs = frozenset({"attention", "keys"})
    attention_rows = "visual"
    paper = "Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment (VisionDrop, AAAI 2026)"
    release = ("github Ruixxxx/VisionDrop @ f7a9444, llava/model/modeling_llama_visiondrop.py "
               "(visiondrop_forward, visiondrop_rank_drop) + llava/visionzip")
    position_policies = ("renumber", "original")
    options = {
        "vision_stage": Option(None, _check_vision_stage,
                               "None: the release's VisionZip stage when patched alone (none in a pipeline); "
                               "False: the LLM stages only"),
        "schedule": Option(None, check_schedule,
                           "explicit [(after_layer, keep), ...] LLM stages; None = the release's, scaled to the depth"),
        "contextual": Option(None, _check_contextual,
                             "share of each stage's tokens that are merged targets; None = the release's"),
    }

    def stages(self, options, keep, n_layers):
        if options["schedule"] is not None:
            check_depth(n_layers, self.name)
            return resolve_stages(options["schedule"], keep, n_layers, "schedule")
        keeps = [Fraction(n, ENTERING) for n in RELEASED_COUNTS[:-1]] + [keep]
        return scaled_stages(RELEASED_LAYERS_OF_32, keeps, n_layers, self.name)

    def attention_layer(self, options):
        return "next"

    def default_positions(self, options, sequential):
        return "renumber" if sequential else "original"

    def budget(self, s, stages, final_keep, n_tokens):
        """The release's stages keep floor(N * count / 48) (exact fractions), an explicit
        schedule's as `transition`'s; the last keeps `keep`; none fewer than the last."""
        from ..config import tokens_to_keep

        final = tokens_to_keep(final_keep, n_tokens)
        if s == len(stages) - 1:
            return final
        keep = stages[s].keep
        if isinstance(keep, Fraction):
            return min(n_tokens, max(final, n_tokens * keep.numerator // keep.denominator))
        return max(floor_budget(keep, n_tokens), final)

    def contextual(self, s, stages, budget, options):
        share = options["contextual"]
        if share is None:
            share = self._released_share(s, stages) if options["schedule"] is None else EXPLICIT_CONTEXTUAL
        return min(max(budget - 1, 0), _round(Fraction(budget) * Fraction(share)))

    @staticmethod
    def _released_share(s, stages) -> Fraction:
        if s == len(stages) - 1:
            return Fraction(RELEASED_CONTEXTUAL[-1], RELEASED_COUNTS[-1])
        index = [Fraction(n, ENTERING) for n in RELEASED_COUNTS].index(stages[s].keep)
        return Fraction(RELEASED_CONTEXTUAL[index], RELEASED_COUNTS[index])

    def score(self, signals, visual, options):
        return signals["attention"]

    def merge(self, keys, candidates, n_targets, options):
        picks, others, group = assign_to_targets(keys[None], candidates[None], n_targets)
        return candidates[picks], candidates[others], group[0]

    def preset(self, config: PruneConfig) -> list[PruneConfig] | None:
        """Patched alone (vision_stage None): [the VisionZip stage, the LLM stages] -- the
        release's two parts; None when only the LLM stages run."""
        if config.options["vision_stage"] is False:
            return None
        keep = config.keep
        if isinstance(keep, int):
            vision_keep, llm_keep = max(keep, _round(Fraction(keep * ENTERING, RELEASED_COUNTS[-1]))), keep
        else:
            vision_keep = min(1.0, keep * ENTERING / RELEASED_COUNTS[-1])
            llm_keep = RELEASED_COUNTS[-1] / ENTERING if vision_keep < 1.0 else keep
        common = dict(positions=config.positions, backend=config.backend)
        vision = PruneConfig.from_kwargs("visionzip", vision_keep, contextual=float(VISION_CONTEXTUAL),
                                         budget=config.budget, video_budget=config.video_budget, **common)
        llm = PruneConfig.from_kwargs("visiondrop", llm_keep, **{**config.options, "vision_stage": False}, **common)
        return [vision, llm]
