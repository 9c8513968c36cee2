"""An image's visual tokens, and their reduction by a vision-stage method.

`reduce_image_tokens` runs a method over the regions of every image of a prefill and says what
each image passes on to the LLM. It is shared by the transformers patches (`base`) and the vLLM
plugin, and imports no model code: the families describe their images as `ImageTokens`.

`reduce_in_stages` runs a pipeline's vision stages one after the other: each later stage reduces
the tokens the stage before it passed on (`later_stage_images`: their features, merged ones
included, and the tower's signals at the slot each token occupies -- the original token it
stands for), and the outcome says what each image passes on in the terms of its original
tokens (`ReducedImages.kept` over them), so the engine compacts the prompt once, as for one
method. `passed_on_count_in_stages` is what it passes on, known before the image is seen (vLLM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from vlm_prune.config import PruneConfig, split_budget
from vlm_prune.kernels import use_backend


class Region:
    """A rectangular grid of one image's tokens that a method reduces as a unit.

    grid: (h, w) for an image or one frame; (t, h, w) for a whole video reduced as one pool.
    slots: [h * w] int64 indices into the image's tokens, in raster order over `grid`. A span
    (`Region.span`: consecutive tokens) makes its index tensor only when something reads it --
    whole-image regions never do, and on a GPU host every tensor made is a launch.
    """

    def __init__(self, slots: torch.Tensor | None, grid: tuple[int, int], start: int | None = None,
                 device: torch.device | str | None = None, crop: int | None = None):
        self.grid = grid
        self.crop = crop  # the tower input (image or crop) the region is, where it is exactly one
        self.start = start  # set by `span`: the slots are start, start+1, ..., read as a slice
        self._slots = slots
        self._device = device
        self.size = len(slots) if slots is not None else math.prod(grid)
        if math.prod(grid) != self.size:
            raise ValueError(f"a {'x'.join(map(str, grid))} region needs {math.prod(grid)} tokens, got {self.size}")

    @classmethod
    def span(cls, start: int, stop: int, grid: tuple[int, int], device=None, crop: int | None = None) -> "Region":
        """The consecutive tokens start..stop-1 as a region."""
        if stop - start != math.prod(grid):
            raise ValueError(f"a {'x'.join(map(str, grid))} region needs {math.prod(grid)} tokens, got {stop - start}")
        return cls(None, grid, start, device, crop)

    @property
    def slots(self) -> torch.Tensor:
        if self._slots is None:
            with torch.inference_mode(False):  # regions may be cached across calls (LLaVA-NeXT's layout)
                self._slots = torch.arange(self.start, self.start + self.size, device=self._device)
        return self._slots

    def covers(self, n_tokens: int) -> bool:
        """True when the region is exactly tokens 0..n_tokens-1 in order."""
        return self.start == 0 and self.size == n_tokens


@dataclass
class ImageTokens:
    """One image's visual tokens as the LLM would receive them.

    features: [N, D] in placeholder order (after the projector: the LLM's input space).
    regions:  grids the method reduces; tokens in no region (a [CLS] feature, LLaVA-NeXT's
              image_newline tokens) are always kept.
    signals:  per-token method signals, each [N, ...] aligned with `features` ("cls_attention",
              "keys", and "pre_projection": the tokens before the projector, [N, Dv]).
    context:  per-image signals ("question": [D]), and per tower input ("cls_feature":
              [crops, Dv], read by the regions that are one crop, `Region.crop`).
    streams:  other per-token inputs the LLM takes at these tokens, each [N, D] aligned with
              `features` (Qwen3-VL's DeepStack levels): each is reduced with the decisions the
              method takes on `features` (see `follow_reduction`).
    budget:   the budget policy of this item where it is not the call's (a video: "per_crop"
              over its frames, or "per_image" for one region over all frames); None: the call's.
    video:    whether the tokens are a video's (counted apart in `stats`).
    tiles:    (rows, cols) of an anyres image's crop grid (LLaVA-NeXT): the region of crop c >= 1
              (`Region.crop`) is tile divmod(c - 1, cols) of it, the regions of one tile row or
              column sharing their height or width; None: no crops. Read by whole-image methods.
    """

    features: torch.Tensor
    regions: list[Region]
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    context: dict[str, torch.Tensor] = field(default_factory=dict)  # per image, not per token
    streams: list[torch.Tensor] = field(default_factory=list)
    budget: str | None = None
    video: bool = False
    tiles: tuple[int, int] | None = None


# context signals given per tower input (image or crop), read by the region that is that input
PER_CROP_CONTEXT = frozenset({"cls_feature"})


def region_budgets(config: PruneConfig, regions: list[Region], budget: str = "per_image") -> list[int]:
    """Tokens each region of an image keeps under the budget policy."""
    sizes = [region.size for region in regions]
    if budget == "per_crop":
        return [config.budget_for(n) for n in sizes]
    return split_budget(config.budget_for(sum(sizes)), sizes)


def video_regions(frames: int, rows: int, cols: int, per_video: bool,
                  device: torch.device | str | None = None) -> tuple[list[Region], str]:
    """A video's regions and their budget policy. Its tokens are `frames` frames of rows x cols,
    frame after frame in raster order: per frame (video_budget="per_frame"), one region per
    frame, each with its own budget ("per_crop"); per video, one region of grid
    (frames, rows, cols), one pool with one budget ("per_image")."""
    per_frame = rows * cols
    if per_video:
        return [Region.span(0, frames * per_frame, (frames, rows, cols), device)], "per_image"
    return [Region.span(f * per_frame, (f + 1) * per_frame, (rows, cols), device) for f in range(frames)], "per_crop"


def passed_on_count(method, config: PruneConfig, regions: list[Region], n_tokens: int,
                    budget: str = "per_image") -> int | None:
    """How many of an image's n_tokens `reduce_image_tokens` passes on, known before the image is
    seen (vLLM reserves the placeholders first): the tokens in no region, plus each region's
    `method.output_count`; None when that depends on the image."""
    counts = [method.output_count(k, region.grid, config.options)
              for region, k in zip(regions, region_budgets(config, regions, budget)) if k > 0]
    if None in counts:
        return None
    return n_tokens - sum(region.size for region in regions) + sum(counts)


@dataclass
class ReducedImages:
    """What the method passed on of each image (the result of `reduce_image_tokens`).

    kept:   per image [N_i] bool, the tokens passed on (or standing for merged ones).
    counts: per image, how many tokens are passed on (host ints).
    source, source_keep: set when every region was reduced by a plain top-k selection of the
            fused kernels: [S, D] all images' tokens in placeholder order and [S] bool, so the
            compaction copies the kept rows from there (`features` is then gathered only if
            something reads it).
    streams: per stream of the images (`ImageTokens.streams`): [sum K_i, D] all images' reduced
            stream tokens in placeholder order (the order of `features`); empty without streams.
    """

    kept: list[torch.Tensor]
    counts: list[int]
    _features: list[torch.Tensor] | None
    source: torch.Tensor | None = None
    source_keep: torch.Tensor | None = None
    _tokens: list[torch.Tensor] | None = None  # with `source`: each image's [N_i, D] tokens
    streams: list[torch.Tensor] = field(default_factory=list)
    # `reduce_in_stages`: per stage, how many tokens of each image it passed on (host ints), and
    # the seconds each stage took (when it was given a clock)
    stage_counts: list[list[int]] = field(default_factory=list)
    stage_s: list[float] = field(default_factory=list)

    @property
    def features(self) -> list[torch.Tensor]:
        """Per image [K_i, D], the tokens passed on."""
        if self._features is None:
            self._features = [tokens.index_select(0, torch.nonzero_static(keep, size=n).flatten())
                              for tokens, keep, n in zip(self._tokens, self.kept, self.counts)]
        return self._features


def reduce_images(method, config: PruneConfig, images: list[ImageTokens], budget: str = "per_image",
                  project=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(kept, features) of `reduce_image_tokens`: per image [N] bool and [K, D]."""
    reduced = reduce_image_tokens(method, config, images, budget, project)
    return reduced.kept, reduced.features


def reduce_image_tokens(method, config: PruneConfig, images: list[ImageTokens], budget: str = "per_image",
                        project=None) -> ReducedImages:
    """Runs a vision-stage method on every region of every image, batching regions of equal
    grid and budget. Shared by the transformers patches and the vLLM plugin.

    project: maps pre-projection tokens to the LLM space (methods that prefer them), or None.

    Every op here is a launch on a GPU host, in every prefill, so: an image that is one region
    over all its tokens (LLaVA-1.5, Qwen images) takes slices instead of index copies and the
    method's output as is; the tokens passed on are counted on the host, so nothing reads the
    device; and when every region was reduced by a fused top-k selection, nothing is gathered
    (`_selected_in_place`).

    Images with `streams` get each stream reduced as their tokens were (`follow_reduction`),
    in `ReducedImages.streams`.

    A whole-image method (one with `reduce_image`) sees all of an image's regions at once, with
    their layout, and sets their budgets itself: see `_reduced_per_image`.
    """
    if getattr(method, "reduce_image", None) is not None:
        return _reduced_per_image(method, config, images)
    budgets = [region_budgets(config, img.regions, img.budget or budget) for img in images]
    whole = [len(img.regions) == 1 and img.regions[0].covers(img.features.shape[0]) for img in images]
    # tokens passed on outside the regions (an image's [CLS] feature, LLaVA-NeXT's newlines)
    counts = [0 if w else img.features.shape[0] - sum(r.size for r in img.regions) for img, w in zip(images, whole)]
    groups: dict[tuple, list[tuple[int, Region]]] = {}
    for i, img in enumerate(images):
        for region, k in zip(img.regions, budgets[i]):
            if k > 0:
                groups.setdefault((region.grid, k), []).append((i, region))
    pre_projection = (method.uses_pre_projection and project is not None
                      and all("pre_projection" in img.signals for img in images))
    n_streams = len(images[0].streams) if images else 0
    if any(len(img.streams) != n_streams for img in images):
        raise ValueError("every image of a prefill must bring the same number of token streams")
    if n_streams and pre_projection:
        raise NotImplementedError(
            f"vlm_prune: method {config.method!r} reduces the tokens before the projector here, and the images' "
            "other token streams cannot follow a reduction of other tokens")
    reductions = []
    settings = []  # per group: (grid, k, signals) of its reduction, which the streams follow
    for (grid, k), members in groups.items():
        source = "pre_projection" if pre_projection else None
        feats = _stack([(images[i].signals[source] if source else images[i].features, r) for i, r in members])
        signals = {
            name: _stack([(images[i].signals[name], r) for i, r in members])
            for name in method.needs if name in images[members[0][0]].signals
        }
        if pre_projection and "llm_features" in method.needs:  # the same tokens, projected
            signals["llm_features"] = _stack([(images[i].features, r) for i, r in members])
        for name in method.needs:
            if name in PER_CROP_CONTEXT:
                if all(name in images[i].context and r.crop is not None for i, r in members):
                    signals[name] = torch.stack([images[i].context[name][r.crop] for i, r in members])
            elif name in images[members[0][0]].context:
                signals[name] = torch.stack([images[i].context[name] for i, _ in members])
        with use_backend(config.backend):
            reduction = method.reduce(feats, grid, k, signals, config.options)
        reductions.append((members, feats, reduction))
        settings.append((grid, k, signals))
    if not pre_projection:
        selected = _selected_in_place(images, whole, counts, reductions)
        if selected is not None:
            selected.streams = [_kept_rows([img.streams[s] for img in images], selected.source_keep,
                                           sum(selected.counts)) for s in range(n_streams)]
            return selected
    reduced = _gathered(method, config, images, whole, counts, reductions, project if pre_projection else None)
    for s in range(n_streams):
        followed = [follow_reduction(method, config, reduction, feats,
                                     _stack([(images[i].streams[s], r) for i, r in members]), *setting)
                    for (members, feats, reduction), setting in zip(reductions, settings)]
        reduced.streams.append(_gathered_stream(images, whole, reduced, reductions, followed, s))
    return reduced


def _reduced_per_image(method, config: PruneConfig, images: list[ImageTokens]) -> ReducedImages:
    """`reduce_image_tokens` for a whole-image method: `method.reduce_image(image, keep, options)`
    gets one image (`ImageTokens`: its tokens, regions, signals, context and `tiles`) and the
    user's `keep` as given (an int or a fraction: the method turns it into the regions' budgets),
    and returns one `Reduction` per region, in `image.regions` order, with a group of one
    (features [1, K, D] or a list of one [K, D]; index likewise, increasing slots of the region):
    the region's tokens it passes on, unchanged (a selection; K may be 0). Tokens in no region
    (LLaVA-NeXT's newlines) pass on as always; other token streams take the same rows. Images
    are reduced one at a time (their counts depend on their content)."""
    whole = [len(img.regions) == 1 and img.regions[0].covers(img.features.shape[0]) for img in images]
    counts = [0 if w else img.features.shape[0] - sum(r.size for r in img.regions) for img, w in zip(images, whole)]
    reductions = []
    for i, img in enumerate(images):
        with use_backend(config.backend):
            per_region = method.reduce_image(img, config.keep, config.options)
        if len(per_region) != len(img.regions):
            raise RuntimeError(f"method {config.method!r} returned {len(per_region)} reductions for "
                               f"{len(img.regions)} regions")
        reductions += [([(i, region)], None, red) for region, red in zip(img.regions, per_region)]
    reduced = _gathered(method, config, images, whole, counts, reductions, None)
    for s in range(len(images[0].streams) if images else 0):
        followed = [[images[i].streams[s][region.slots][red.index[0]]] for [(i, region)], _, red in reductions]
        reduced.streams.append(_gathered_stream(images, whole, reduced, reductions, followed, s))
    return reduced


@dataclass(frozen=True)
class VisionStage:
    """One vision-stage method of a pipeline, as `reduce_in_stages` runs it: the method, the
    config its `reduce` runs with ("auto" options resolved) and its budget policy."""

    method: Any
    config: PruneConfig
    budget: str = "per_image"


def reduce_in_stages(stages: Sequence[VisionStage], images: Sequence[list[ImageTokens]], project=None,
                     clock: Callable[[], float] | None = None) -> ReducedImages:
    """Runs the vision stages of a pipeline on every image: the first as `reduce_image_tokens`
    does, each later one on what the one before passed on (`later_stage_images`). One stage is
    exactly `reduce_image_tokens`.

    images: per stage, the images as that stage's family description gives them (the same
    tokens; regions after the stage's budget policy, signals after its method's needs); one list
    may serve every stage. project: as for `reduce_image_tokens`, first stage only (a later
    stage gets the tokens passed on, in the LLM's space). clock: host seconds, to time each stage
    (`ReducedImages.stage_s`).

    Returns what each image passes on after the last stage, over its ORIGINAL tokens: `kept`
    [N_i] flags the slots the final tokens occupy (each stands for the original token of its
    slot), `features` the final tokens, `streams` the images' other token streams reduced by
    every stage in turn; `stage_counts` the tokens each stage passed on per image."""
    first = stages[0]
    start = clock() if clock is not None else 0.0
    reduced = reduce_image_tokens(first.method, first.config, images[0], first.budget, project)
    stage_counts, seconds = [list(reduced.counts)], []
    for stage, described in zip(stages[1:], images[1:]):
        if clock is not None:
            now = clock()
            seconds.append(now - start)
            start = now
        slots = [torch.nonzero_static(keep, size=n).flatten() for keep, n in zip(reduced.kept, reduced.counts)]
        later = reduce_image_tokens(stage.method, stage.config, later_stage_images(described, reduced, slots),
                                    stage.budget)
        reduced = _composed(reduced, slots, later)
        stage_counts.append(list(reduced.counts))
    if clock is not None:
        seconds.append(clock() - start)
    reduced.stage_counts, reduced.stage_s = stage_counts, seconds
    return reduced


def later_stage_images(images: list[ImageTokens], reduced: ReducedImages,
                       slots: list[torch.Tensor] | None = None) -> list[ImageTokens]:
    """The images as a later stage of a pipeline gets them: the tokens `reduced` passed on.

    images: the images as the later stage's description gives them (all their original tokens,
    its regions and signals); slots: per image [K_i] the original slot each passed-on token
    occupies (increasing; made from `reduced.kept` when not given). Each image's features are
    the tokens passed on ([K_i, D], merged ones as merged), its per-token signals the tower's at
    those slots, its other token streams the reduced ones; its per-image context is unchanged.
    Each region becomes the passed-on tokens whose slots lie in it, as one 1 x n row (no grid: a
    later stage works on any subset), keeping its crop; a region none of them lies in is left
    out, and tokens in no region still pass on untouched. The "pre_projection" signal is left
    out: a later stage reduces the tokens in the LLM's space, where the merged ones are.

    Where every image is one region over all its tokens (LLaVA-1.5, a Qwen image), nothing is
    read from the device; otherwise the regions' sizes are read, once for all images."""
    if slots is None:
        slots = [torch.nonzero_static(keep, size=n).flatten() for keep, n in zip(reduced.kept, reduced.counts)]
    features = reduced.features
    streams = [stream.split(reduced.counts) for stream in reduced.streams]
    members: list[list[tuple[Region, torch.Tensor]]] = []  # per image: (region, [K_i] bool of its tokens in it)
    for img, s in zip(images, slots):
        n = img.features.shape[0]
        if len(img.regions) == 1 and img.regions[0].covers(n):
            members.append([(img.regions[0], None)])
            continue
        inside = []
        for region in img.regions:
            flags = torch.zeros(n, dtype=torch.bool, device=s.device)
            flags[region.slots.to(s.device)] = True
            inside.append((region, flags.index_select(0, s)))
        members.append(inside)
    flagged = [flags for inside in members for _, flags in inside if flags is not None]
    sizes = iter(torch.stack([flags.sum() for flags in flagged]).tolist() if flagged else [])
    out = []
    for i, (img, s, inside) in enumerate(zip(images, slots, members)):
        k, device = reduced.counts[i], features[i].device
        regions = []
        for region, flags in inside:
            if flags is None:  # the whole image: all the tokens passed on
                size, positions = k, None
            else:
                size = next(sizes)
                positions = torch.nonzero_static(flags, size=size).flatten()
            if size == 0:
                continue
            if positions is None:
                regions.append(Region.span(0, size, (1, size), device, crop=region.crop))
            else:
                regions.append(Region(positions.to(device), (1, size), crop=region.crop))
        signals = {name: value.index_select(0, s.to(value.device)) for name, value in img.signals.items()
                   if name != "pre_projection"}
        out.append(ImageTokens(features[i], regions, signals, dict(img.context),
                               [stream[i] for stream in streams], budget=img.budget, video=img.video))
    return out


def _composed(earlier: ReducedImages, slots: list[torch.Tensor], later: ReducedImages) -> ReducedImages:
    """A later stage's reduction (over the tokens `earlier` passed on, which occupy `slots`) in
    the terms of the images' original tokens: the slots of the tokens it passed on flagged."""
    kept = []
    for flags, s, keep, n in zip(earlier.kept, slots, later.kept, later.counts):
        out = torch.zeros_like(flags)
        out[s.index_select(0, torch.nonzero_static(keep, size=n).flatten())] = True
        kept.append(out)
    return ReducedImages(kept, list(later.counts), later.features, streams=later.streams)


def passed_on_count_in_stages(stages: Sequence[VisionStage], regions: Sequence[list[Region]], n_tokens: int,
                              budgets: Sequence[str | None] | None = None) -> int | None:
    """How many of an image's n_tokens `reduce_in_stages` passes on, known before the image is
    seen (vLLM reserves the placeholders first); None when that depends on the image.

    regions: per stage, the image's regions as that stage's description gives them; budgets: per
    stage, the budget policy it applies to them (None: the stage's own, `VisionStage.budget`).
    Known when each method's `output_count` is, and each later stage's regions hold a known
    number of the tokens passed on: every group of tokens an earlier stage reduced lies wholly
    inside or wholly outside each of them (a region that splits such a group gets a number that
    depends on which tokens were kept). One stage: `passed_on_count`."""
    # what has passed on so far: groups of (original slots, how many of them pass on)
    groups: list[tuple[frozenset[int], int]] = [(frozenset(range(n_tokens)), n_tokens)]
    for s, stage in enumerate(stages):
        budget = (budgets[s] if budgets is not None else None) or stage.budget
        covered: set[int] = set()
        sizes, region_slots = [], []
        for region in regions[s]:
            slots = frozenset(range(region.start, region.start + region.size) if region.start is not None
                              else region.slots.tolist())
            size = 0
            for group, count in groups:
                part = group & slots
                if not part:
                    continue
                if part == group:
                    size += count
                elif count == len(group):  # a group passed on whole: any part of it is known
                    size += len(part)
                else:
                    return None
            sizes.append(size)
            region_slots.append(slots)
            covered |= slots
        kept_groups = []
        for group, count in groups:  # tokens in no region pass on as they are
            rest = group - covered
            if rest == group:
                kept_groups.append((group, count))
            elif rest:
                if count != len(group):
                    return None
                kept_groups.append((rest, len(rest)))
        given = list(regions[s]) if s == 0 else [Region.span(0, n, (1, n)) for n in sizes]
        for region, slots, k in zip(given, region_slots, region_budgets(stage.config, given, budget)):
            count = stage.method.output_count(k, region.grid, stage.config.options) if k > 0 else 0
            if count is None:
                return None
            kept_groups.append((slots, count))
        groups = kept_groups
    return sum(count for _, count in groups)


def follow_reduction(method, config: PruneConfig, reduction, feats: torch.Tensor, stream: torch.Tensor,
                     grid: tuple[int, int], k: int, signals: dict[str, torch.Tensor]):
    """`stream` [M, n, D], tokens aligned with `feats` (a group the method reduced into
    `reduction`), reduced with the decisions the method took on `feats`: [M, K, D], or a list
    of [K_i, D] where the method's output is one.

    A selection (`Reduction.of`) takes the same rows. Otherwise the stream is the method's
    forward-mode derivative at `feats` in the stream's direction (`torch.autograd.forward_ad`):
    the method runs again on `feats` with the same signals, so it takes the same decisions, and
    the tangent carries the stream through what it does to the tokens once decided. For a
    method whose output is linear in the tokens given its decisions -- every built-in one:
    selections, means and score-weighted means of groups, pooling, the DCT low-pass -- that is
    exactly the method's reduction applied to the stream. A kernel of the method's own run on
    the tokens themselves (not on its signals) carries no tangent: refused, such a method must
    return a selection."""
    if reduction.selection is not None:
        index = reduction.selection.index
        return stream.gather(1, index[..., None].expand(-1, -1, stream.shape[-1]))
    if stream.shape != feats.shape or stream.dtype != feats.dtype:
        raise ValueError(f"a token stream of shape {tuple(stream.shape)} ({stream.dtype}) cannot follow the reduction "
                         f"of tokens of shape {tuple(feats.shape)} ({feats.dtype})")
    if "llm_features" in method.needs and "llm_features" not in signals:
        # the tokens are in the LLM's space: what the method compares there is them, as plain
        # values (its comparisons only decide)
        signals = {**signals, "llm_features": feats}
    from torch.autograd import forward_ad

    # forward AD is off under inference mode and carries no tangent of an inference tensor (the
    # caller's grad mode is kept: autograd goes through the tangents too)
    with torch.inference_mode(False), forward_ad.dual_level(), use_backend(config.backend):
        if feats.is_inference() or stream.is_inference():
            feats, stream = feats.clone(), stream.clone()
        try:
            out = method.reduce(forward_ad.make_dual(feats, stream), grid, k, signals, config.options).features
        except NotImplementedError as error:  # an op without a forward-mode derivative
            raise NotImplementedError(f"vlm_prune: method {config.method!r} cannot carry the images' other token "
                                      f"streams through its reduction ({error})") from error
        parts = [out] if isinstance(out, torch.Tensor) else list(out)
        tangents = [forward_ad.unpack_dual(part).tangent for part in parts]
    if any(t is None for t in tangents):
        raise NotImplementedError(
            f"vlm_prune: method {config.method!r} computes its output tokens in a way the images' other token streams "
            "cannot follow (a kernel of its own on the tokens?); return a selection (`Reduction.of`)")
    return tangents[0] if isinstance(out, torch.Tensor) else tangents


def _kept_rows(tokens: list[torch.Tensor], keep: torch.Tensor, count: int) -> torch.Tensor:
    """[count, D]: the rows of the images' tokens (placeholder order) that `keep` [S] flags."""
    source = _consecutive(tokens)
    if source is None:
        source = torch.cat(tokens)
    return source.index_select(0, torch.nonzero_static(keep.to(source.device), size=count).flatten())


def _gathered_stream(images: list[ImageTokens], whole: list[bool], reduced: ReducedImages, reductions: list,
                     followed: list, s: int) -> torch.Tensor:
    """Stream s of every image after the reduction, in placeholder order, laid out as
    `_gathered` lays out the features (tokens in no region pass on unchanged). followed: per
    group of `reductions`, its stream tokens reduced."""
    outputs = [img.streams[s][:0] if w else img.streams[s].clone() for img, w in zip(images, whole)]
    for (members, _, red), group in zip(reductions, followed):
        for j, (i, region) in enumerate(members):
            tokens = group[j].to(outputs[i].dtype)
            if whole[i]:
                outputs[i] = tokens
            else:
                outputs[i][region.slots[red.index[j]]] = tokens
    return _cat([out if w else out.index_select(0, torch.nonzero_static(keep, size=n).flatten())
                 for out, keep, w, n in zip(outputs, reduced.kept, whole, reduced.counts)])


def _gathered(method, config: PruneConfig, images: list[ImageTokens], whole: list[bool], counts: list[int],
              reductions: list, project) -> ReducedImages:
    """The reductions as each image's tokens passed on, gathered (see `reduce_image_tokens`)."""
    kept: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    for img, w in zip(images, whole):
        n = img.features.shape[0]
        if w:  # stays so only if its region passes nothing on
            kept.append(torch.zeros(n, dtype=torch.bool, device=img.features.device))
            outputs.append(img.features[:0])
            continue
        keep = torch.ones(n, dtype=torch.bool, device=img.features.device)
        for region in img.regions:
            keep[region.slots] = False
        kept.append(keep)
        outputs.append(img.features.clone())
    # the built-in methods are tested to return increasing indices; others are checked, with
    # one device read at the end rather than one per group
    check_order = not type(method).__module__.startswith("vlm_prune.methods.")
    increasing = []
    for members, feats, red in reductions:
        if check_order:
            rows = [red.index] if isinstance(red.index, torch.Tensor) else red.index  # lists: counts vary per image
            increasing += [(r[..., 1:] > r[..., :-1]).all() for r in rows if r.shape[-1] > 1]
        for j, (i, region) in enumerate(members):
            index, reduced = red.index[j], red.features[j]
            counts[i] += index.shape[0]
            if project is not None:
                reduced = project(reduced)
            if whole[i]:
                kept[i].index_fill_(0, index, True)
                outputs[i] = reduced.to(images[i].features.dtype)
                continue
            slots = region.slots[index]
            outputs[i][slots] = reduced.to(outputs[i].dtype)
            kept[i][slots] = True
    if increasing and not bool(torch.stack(increasing).all()):
        raise RuntimeError(f"method {config.method!r} returned unsorted or repeated token indices")
    features = [out if w else out.index_select(0, torch.nonzero_static(k, size=n).flatten())
                for out, k, w, n in zip(outputs, kept, whole, counts)]
    return ReducedImages(kept, counts, features)


def _selected_in_place(images: list[ImageTokens], whole: list[bool], counts: list[int],
                       reductions: list) -> ReducedImages | None:
    """The reduction as keep flags over the images' tokens where they lie, or None.

    Possible when every region's reduction is a fused top-k selection of the tokens it was given:
    the prefill compaction then copies the kept rows from the images' tokens, with no gather
    first (from the tower's output itself when they follow one another there, as LLaVA-1.5's
    and Qwen's do; else from one concatenated copy, one op). `counts`: the tokens each image
    passes on outside its regions. Nothing is read from the device here."""
    picked: dict[tuple[int, int], tuple] = {}  # (image, id of region) -> (selection, its row)
    for members, feats, red in reductions:
        selection = red.selection
        if selection is None or selection.slots is None or selection.source is not feats:
            return None
        for j, (i, region) in enumerate(members):
            picked[i, id(region)] = (selection, j)
    tokens = [img.features for img in images]
    source = _consecutive(tokens)
    if source is None:
        source = torch.cat(tokens)
    keep = []
    counts = list(counts)
    for i, img in enumerate(images):
        picks = [picked.get((i, id(region))) for region in img.regions]
        counts[i] += sum(p[0].k for p in picks if p is not None)
        if whole[i] and picks[0] is not None:
            keep.append(picks[0][0].keep[picks[0][1]])
            continue
        flags = torch.ones(img.features.shape[0], dtype=torch.bool, device=img.features.device)
        for region, pick in zip(img.regions, picks):  # a region that passes nothing on: all off
            flags[region.slots] = pick[0].keep[pick[1]] if pick is not None else False
        keep.append(flags)
    one_group = len(reductions) == 1 and len(reductions[0][0]) == len(images) and all(whole) and \
        [i for i, _ in reductions[0][0]] == list(range(len(images)))
    # one group of whole images in image order: its keep flags are already one [S] view
    flat_keep = reductions[0][2].selection.keep.reshape(-1) if one_group else torch.cat(keep)
    return ReducedImages(keep, counts, None, source, flat_keep, tokens)


def _consecutive(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """[sum N_i, D]: row-major [N_i, D] tensors that follow one another in one storage, as one
    view of it; None when they do not."""
    first = tensors[0]
    if first.dim() != 2:
        return None
    rows, width = 0, first.shape[1]
    for t in tensors:
        if (t.dim() != 2 or t.shape[1] != width or t.dtype != first.dtype or (t.shape[0] > 1 and t.stride(0) != width)
                or t.stride(1) != 1 or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.data_ptr() != first.data_ptr() + rows * width * first.element_size()):
            return None
        rows += t.shape[0]
    return first.as_strided((rows, width), (width, 1))


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _stack(parts: list[tuple[torch.Tensor, Region]]) -> torch.Tensor:
    """[M, n, ...]: each tensor's rows of its region. A view, not a copy, when a single region
    spans them or when they are equally spaced slices of one tensor (a batch's images, which
    the families hand over as rows of the tower's [I, N, D] output)."""
    taken = [x[r.start:r.start + r.size] if r.start is not None else x[r.slots] for x, r in parts]
    if len(taken) == 1:
        return taken[0].unsqueeze(0)
    view = _as_batch_view(taken)
    return view if view is not None else torch.stack(taken)


def _as_batch_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """torch.stack(tensors) as a view of their common storage, or None when they are not
    equally spaced in it with equal shapes and strides."""
    first = tensors[0]
    base = first.untyped_storage().data_ptr()
    step_bytes = tensors[1].data_ptr() - first.data_ptr()
    if step_bytes <= 0 or step_bytes % first.element_size():
        return None
    for i, t in enumerate(tensors):
        if (t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype
                or t.untyped_storage().data_ptr() != base or t.data_ptr() != first.data_ptr() + i * step_bytes):
            return None
    return first.as_strided((len(tensors), *first.shape), (step_bytes // first.element_size(), *first.stride()))
