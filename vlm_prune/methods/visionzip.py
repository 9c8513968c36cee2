"""`visionzip`: VisionZip -- dominant tokens by [CLS] attention + contextual tokens merged by key similarity.

The released rules (github dvlab-research/VisionZip, commit 3151f6d; `visionzip/utils.py` and
`visionzip/clip_encoder.py`, unchanged since a9a3258), for a budget of k tokens per image (crop):

- counts: C = round(k * 10 / 64) contextual tokens (the release's 54 + 10 at 64; 108 + 20 and
  162 + 30 at 128 and 192, the paper's settings) and D = k - C "dominant" ones, the [CLS] token
  included: the [CLS] feature + the D - 1 patches its query attends to most (attention of the
  feature layer, heads summed -- the same ranking as averaged);
- the R remaining patches (raster order) are candidates; targets are every step-th of them,
  step = max(1, R // C), the first C; every other candidate joins the target whose key is most
  similar (the layer's keys averaged over heads, L2-normalised, dot product; ties to the first
  target); a contextual token = its target + the mean of the others that joined it (the target
  alone when none did);
- all of this on the tower's features of the feature layer, before the projector (the family
  projects the result);
- the LLM receives [CLS], the dominant patches in raster order, then the contextual tokens in
  target order.

Where the engine keeps original position ids (positions="original", Qwen-VL's only policy) the
tokens must sit at positions of their own: the [CLS] token has none, so it is left out (its
slot goes to one more dominant patch), and tokens are in raster order of the patch each stands
for (a contextual token: its target). This is the `layout` option's "raster"; "release" is the
layout above, "auto" (default) picks "release" under renumbered positions and "raster" under
original ones. Towers without [CLS] (Qwen-VL) get D dominant patches.

Option `contextual`: an int = that many contextual tokens, a float = that share of k (rounded),
instead of round(k * 10 / 64) -- the release's `--contextual` argument (VisionDrop's release runs
VisionZip's stage with 42 + 6: `contextual=0.125` of 48).

Edge cases: fewer candidates than C (the release leaves R // C == 0 undefined: step 1 and
only R targets) gives C = R; a budget of all the tokens keeps them all unchanged (keep=1.0
changes nothing).

`Reduction.index` lists the slots the k output tokens occupy, increasing: the patches the tokens
stand for, and with the [CLS] token one more slot (the first free one) that carries it -- under
renumbered positions only how many slots are kept matters.
"""

from __future__ import annotations

import torch

from ..config import Option
from ..registry import register_method
from .base import Reduction, VisionMethod, keep_top_k, layout_option, resolve_layout

CONTEXTUAL_OF_64 = 10


def contextual_count(k: int) -> int:
    """Contextual tokens of a budget of k (the release: 10 of 64)."""
    return min(k - 1, round(k * CONTEXTUAL_OF_64 / 64)) if k > 1 else 0


def _check_contextual(name, value):
    from ..config import is_number

    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if is_number(value) and not isinstance(value, int) and 0.0 <= value < 1.0:
        return float(value)
    raise ValueError(f"{name}={value!r} must be None, an int >= 0 (tokens) or a fraction in [0, 1) of the budget")


def _contextual_of(k: int, option) -> int:
    """Contextual tokens of a budget of k under the `contextual` option (never all k)."""
    if option is None:
        return contextual_count(k)
    count = option if isinstance(option, int) else int(k * option + 0.5)
    return min(max(k - 1, 0), count)


def merge_into_targets(features: torch.Tensor, keys: torch.Tensor, rest: torch.Tensor, n_targets: int):
    """The contextual tokens of the candidates `rest` [I, R] (raster order).

    features: [I, N, D]; keys: [I, N, Dk] (heads averaged). Targets are rest[:, ::step][:, :n_targets]
    with step = max(1, R // n_targets). Returns (contextual [I, C, D] float32, targets [I, C])."""
    picks, others, group = assign_to_targets(keys, rest, n_targets)
    return merge_states(features, rest[:, picks], rest[:, others], group), rest[:, picks]


def assign_to_targets(keys: torch.Tensor, rest: torch.Tensor, n_targets: int):
    """Which candidates are targets and which target each other one joins.

    keys: [I, N, Dk]; rest: [I, R] candidate slots. Returns (picks [C], others [R - C]: positions
    in `rest`, the same for every image; group [I, R - C]: the target (0..C-1) each other joins)."""
    n_rest = rest.shape[1]
    step = max(1, n_rest // n_targets)
    picks = torch.arange(0, n_rest, step, device=rest.device)[:n_targets]
    unit = keys.gather(1, rest[..., None].expand(-1, -1, keys.shape[-1])).float()
    unit = unit / unit.norm(dim=-1, keepdim=True)  # the release divides by the norm (no epsilon)
    is_other = torch.ones(n_rest, dtype=torch.bool, device=rest.device)
    is_other[picks] = False
    others = is_other.nonzero().flatten()
    similarity = unit[:, others] @ unit[:, picks].transpose(1, 2)  # [I, R - C, C]
    return picks, others, similarity.argmax(-1)  # first maximum on ties


def merge_states(features: torch.Tensor, targets: torch.Tensor, joiners: torch.Tensor, group: torch.Tensor):
    """Each target's feature + the mean of the features that joined it (the target alone when none
    did). features [I, N, D]; targets [I, C], joiners [I, J] slots; group [I, J] in 0..C-1.
    Returns [I, C, D] float32."""
    n_images, dim = features.shape[0], features.shape[-1]
    n_targets = targets.shape[1]
    joined = features.gather(1, joiners[..., None].expand(-1, -1, dim)).float()
    sums = torch.zeros(n_images, n_targets, dim, device=features.device).scatter_add_(
        1, group[..., None].expand(-1, -1, dim), joined)
    counts = torch.zeros(n_images, n_targets, device=features.device).scatter_add_(
        1, group, torch.ones_like(group, dtype=torch.float32))
    own = features.gather(1, targets[..., None].expand(-1, -1, dim)).float()
    return own + sums / counts.clamp(min=1)[..., None]


@register_method
class VisionZip(VisionMethod):
    name = "visionzip"
    needs = frozenset({"cls_attention", "keys", "cls_feature"})
    optional_needs = frozenset({"cls_feature"})
    uses_pre_projection = True
    default_budget = "per_crop"  # the release runs on each LLaVA-NeXT crop, the base image too, with k each
    paper = "VisionZip: Longer is Better but Not Necessary in Vision Language Models (CVPR 2025)"
    release = "github dvlab-research/VisionZip @ 3151f6d, visionzip/utils.py + clip_encoder.py"
    options = {
        "layout": layout_option("[CLS], dominant (raster), contextual (target order)"),
        "contextual": Option(None, _check_contextual,
                             "contextual tokens per image (crop): an int, or a share of the budget; None = round(keep * 10 / 64), the release's 10 of 64"),
    }

    def resolve_options(self, options, positions):
        return resolve_layout(options, positions, "visionzip",
                              "puts the [CLS] token and the contextual tokens out of raster order")

    def reduce(self, features, grid, k, signals, options) -> Reduction:
        n_images, n_tokens, dim = features.shape
        if k >= n_tokens:  # keep everything: the identity (keep=1.0 changes nothing)
            index = torch.arange(n_tokens, device=features.device).expand(n_images, -1)
            return Reduction(features, index)
        release = options["layout"] == "release"
        cls = signals.get("cls_feature") if release else None  # [I, D]
        n_context = _contextual_of(k, options.get("contextual"))
        n_context = min(n_context, n_tokens - (k - n_context))  # never more targets than candidates
        n_dominant = k - n_context - (cls is not None)  # patches, the [CLS] token not counted
        dominant = keep_top_k(signals["cls_attention"], n_dominant)  # [I, D'] raster order
        parts = [features.gather(1, dominant[..., None].expand(-1, -1, dim)).float()]
        slots = [dominant]
        if n_context:
            taken = torch.zeros(n_images, n_tokens, dtype=torch.bool, device=features.device)
            taken.scatter_(1, dominant, True)
            rest = (~taken).nonzero()[:, 1].view(n_images, -1)
            merged, targets = merge_into_targets(features, signals["keys"], rest, n_context)
            parts.append(merged)
            slots.append(targets)
        index = torch.cat(slots, 1)
        out = torch.cat(parts, 1)
        if not release:  # raster order of what each token stands for
            order = index.argsort(dim=1)
            return Reduction(out.gather(1, order[..., None].expand(-1, -1, dim)).to(features.dtype),
                             index.gather(1, order))
        if cls is not None:
            out = torch.cat([cls.float()[:, None], out], 1)
            index = torch.cat([_first_free(index, n_tokens)[:, None], index], 1)
        return Reduction(out.to(features.dtype), index.sort(dim=1).values)


def _first_free(used: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[I] the lowest slot not in `used` [I, K] (K < n_tokens)."""
    free = torch.ones(used.shape[0], n_tokens, dtype=torch.bool, device=used.device)
    free.scatter_(1, used, False)
    return free.to(torch.int8).argmax(1)
