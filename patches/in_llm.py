"""The in-LLM pruning engine for stage-"llm" methods (transition, fastv), on every family.

The outer sequence never changes: input ids, the 2D mask and position ids stay as the caller
made them, and layer 0's cache holds every token. Inside the decoder, tokens are dropped after
given layers, progressively:

- prefill: forward hooks gather the method's signals (sub-module transitions, a few attention
  rows recomputed with RoPE -- SDPA stays on -- from the q/k of the last layer before a stage,
  or of the stage's first layer applied to the unpruned sequence, as the method asks); at the
  first layer of each stage a pre-hook scores the visual tokens still present, keeps the top
  ones per image and slices the hidden states; every later layer gets the attention mask,
  position embeddings and position ids of the tokens it sees.
- positions: "original" -- kept tokens keep their position ids (sliced from the model's);
  "renumber" (1-D RoPE families only) -- a token at a layer of stage s sits at its position
  minus the tokens stages <= s dropped before it (a renumbered sequence, per row), and those
  layers get position embeddings the language model's own rotary embedding computes for these
  ids (once per stage).
- decode: each layer's cache holds the tokens that layer saw; the decode mask (built for layer
  0's length) gets its columns sliced the same way per layer, and, renumbered, the new tokens'
  positions at stage s are theirs minus every token stage s dropped.
- a prompt with images on a non-empty cache (a later turn brings a new image): a prefill of the
  new tokens whose layers also attend to what their cache holds (`CachedColumns`); the
  attention rows a method scores with see the cached keys too.
- generate(use_cache=False): later steps reuse the prompt's selection (generated tokens are
  never dropped), which is what the cached run computes.

Rows that keep different numbers of tokens (different images per row) are left-padded inside
the decoder; the padding is masked. A family that adds per-token inputs between decoder layers
(Qwen3-VL's DeepStack) reads the columns the hidden states hold from `token_columns()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from vlm_prune.compat import (bind_to_kwargs, cache_length, get_cache, is_static_cache, layer_keys,
                               static_cache_slots)
from vlm_prune.config import PruneConfig
from vlm_prune.kernels import attention_from_rows, transition_variation
from vlm_prune.registry import get_method
from vlm_prune.timing import clock

from .adapters.base import AttentionParts, FamilyAdapter, Plan
from .model_hooks import (PatchBase, PerCall, Phase, _is_prepared, _padding_mask, _per_row, _prompt_columns, _row_of_images,
                          kw_batch, kw_device, kw_length)


@dataclass
class PromptContext:
    """Facts about the prompt, fixed for one generate() call."""

    length: int  # L
    is_image: torch.Tensor  # [B, L] bool
    image_id: torch.Tensor  # [B, L] int64: index of the image (in batch order) a token belongs to, -1 = text
    image_sizes: list[int]  # tokens per image
    instruction: torch.Tensor  # [B, L] bool: the text after each row's last image
    real: torch.Tensor  # [B, L] bool: the prompt's real tokens (not padding, not a draft's candidates)
    last: torch.Tensor  # [B] int64: the row's last real prompt token
    mask2d: torch.Tensor | None  # [B, L] the caller's attention mask
    visual_per_row: list[int]  # host copies (read before the decoder runs) ...
    instruction_per_row: list[int]  # ... so the stages never wait for the device


@dataclass
class LLMPromptState:
    """What an in-LLM prefill decided, as decode steps on the cache it filled need it."""

    length: int  # L, the prompt's columns (layer 0 holds them all)
    stage_index: list[torch.Tensor]  # per stage: [B, L_s] kept prompt columns, -1 = pad
    stage_padded: list[bool]
    stage_layers: tuple[int, ...]  # each stage's first layer: which layers hold which columns
    renumbered: bool = False  # the layers after each stage hold keys at renumbered positions


@dataclass
class CachedColumns:
    """A prompt with images that continues a KV cache (a later turn brings a new image): what
    each stage's layers already hold, in layer 0's columns (0 .. length-1)."""

    length: int  # columns before the new tokens
    stage_keys: list[torch.Tensor]  # per stage: [B, K_s] the columns its layers' cache holds, -1 = pad
    stage_padded: list[bool]
    mask2d: torch.Tensor | None  # [B, length] the caller's mask of those columns

    def columns(self, s: int) -> torch.Tensor:
        """[B, K] the cached columns of stage s's layers (s = -1: the layers before the first
        stage, which hold every column)."""
        if s >= 0:
            return self.stage_keys[s]
        index = self.stage_keys[0]
        return torch.arange(self.length, device=index.device).expand(index.shape[0], -1)

    def dropped(self, s: int) -> torch.Tensor:
        """[B] the cached columns stage s dropped (none for s = -1)."""
        if s < 0:
            return torch.zeros_like(self.stage_keys[0][:, 0])
        return self.length - (self.stage_keys[s] >= 0).sum(1)

    def joined(self, stage_index: list[torch.Tensor], stage_padded: list[bool], length: int,
               stage_layers: tuple[int, ...], renumbered: bool) -> LLMPromptState:
        """The state of the whole conversation: these columns, then the new tokens' (`stage_index`,
        counted from the new tokens' first, `length` of them) after them."""
        index = [torch.cat([keys, torch.where(new >= 0, new + self.length, -1)], dim=1)
                 for keys, new in zip(self.stage_keys, stage_index)]
        padded = [a or b for a, b in zip(self.stage_padded, stage_padded)]
        return LLMPromptState(self.length + length, index, padded, stage_layers, renumbered)


class LLMStageEngine(PatchBase):
    """In-LLM pruning on one model instance, through its family's adapter (its decoder's parts;
    see the module docstring)."""

    # per call (see model_hooks.PerCall): where the forward is and what the prefill decided so far
    phase = PerCall(Phase.OFF)
    prompt = PerCall(None)  # PromptContext of the prefill
    stage_index = PerCall(factory=list)  # per stage: [B, L_s] kept prompt columns, -1 = pad
    stage_padded = PerCall(factory=list)
    merge_plan = PerCall(factory=list)  # per stage: [(row, target columns, joiner columns, group)]
    _lengths = PerCall(factory=list)  # tokens each decoder layer processes in this prefill
    _key_slots = PerCall(None)  # see _outer_hook
    _sliced = PerCall(None)  # see _per_stage
    _columns = PerCall(factory=dict)  # see _columns_of
    _prompt_length = PerCall(0)  # the columns of the prompt whose cache a decode step continues
    _cached = PerCall(None)  # set while a prompt with images continues a cache
    _ttv = PerCall(None)
    _attention = PerCall(None)
    _index = PerCall(None)
    _present = PerCall(None)
    _row_len = PerCall(None)
    _padded_now = PerCall(False)
    _select_s = PerCall(0.0)
    _decode_start = PerCall(0)
    _length = PerCall(0)
    _q = PerCall(None)
    _k = PerCall(None)
    _keys = PerCall(None)  # [B, L', Dh] the scoring layer's keys, for a merging method
    _entered = PerCall(False)  # whether this forward's decoder entered a stage yet (see token_columns)

    def __init__(self, model: torch.nn.Module, config: PruneConfig, adapter_cls: type[FamilyAdapter]):
        super().__init__(model, config)
        self.method = get_method(config.method)()
        self.positions = self._position_policy(model, config, adapter_cls)
        self.adapter = adapter_cls(model, Plan(self.method, config, config, self.positions, "pooled"))
        self.upstream = None  # a pipeline's vision stage, whose compacted forwards this engine sees
        self.decoder = self.adapter.decoder()
        self.layers = [parts.module for parts in self.decoder.layers]
        # layers whose token mixer keeps a recurrent state (Qwen3.5's Gated DeltaNet): a 2-D padding mask
        self.recurrent = frozenset(i for i, parts in enumerate(self.decoder.layers)
                                   if getattr(parts, "recurrent", False))
        self.stages = self.method.stages(config.options, config.keep, len(self.layers))
        self.transition_layers = self.method.transition_layers(config.options, self.stages)
        self.rows = self.method.query_rows(config.options)
        # the attention rows from the stage's first layer, on the sequence it would see unpruned
        self.rows_from_next = self.rows is not None and self.method.attention_layer(config.options) == "next"
        self.ttv_domain = self.method.transition_domain(config.options)
        self.renumber = self.positions == "renumber"
        self.stage_starts = {stage.after_layer: i for i, stage in enumerate(self.stages)}
        self.first = self.stages[0].after_layer  # 0-based index of the first layer that sees fewer tokens
        self._stage_layers = tuple(stage.after_layer for stage in self.stages)
        self.layer_lengths: list[int] = []  # of the last prefill (published, see _start_prefill)

    def _position_policy(self, model: torch.nn.Module, config: PruneConfig, adapter_cls: type[FamilyAdapter]) -> str:
        """The layers' position ids after a stage: config.positions, or the method's default for
        the family; renumbering needs 1-D positions."""
        sequential = adapter_cls.sequential_positions
        policy = config.positions or self.method.default_positions(config.options, sequential)
        if policy == "renumber" and not sequential:
            raise ValueError(
                f"positions='renumber' is not supported on {type(model).__name__}: its M-RoPE position ids are "
                "3-D (time, height, width of each image token), so numbering the kept tokens consecutively has no "
                "meaning there (TransPrune's release is LLaVA-only); use positions='original', this family's default"
            )
        return policy

    # -- install / remove -------------------------------------------------------------------

    def remove(self) -> None:
        super().remove()
        self._sliced = None
        self._columns = {}

    def install(self) -> None:
        inner = self.adapter.target_module()
        self._forward = inner.forward
        self._hooks.append(inner.register_forward_pre_hook(self._outer_hook, with_kwargs=True))
        self._hooks.append(inner.register_forward_hook(self._tag_cache))
        for i, parts in enumerate(self.decoder.layers):
            # partials of bound methods, not closures: a deep copy of the model gets its own
            self._hooks.append(parts.module.register_forward_pre_hook(partial(self._layer_hook, i), with_kwargs=True))
            if i + 1 in self.transition_layers:
                hook = self._transition_hook
                self._hooks.append(parts.attention.module.register_forward_hook(hook, with_kwargs=True))
                self._hooks.append(parts.mlp.register_forward_hook(hook, with_kwargs=True))
            if self.rows is not None and not self.rows_from_next and i + 1 in self.stage_starts:
                attn = parts.attention
                self._hooks.append(attn.q_proj.register_forward_hook(partial(self._keep_output, "q")))
                self._hooks.append(attn.k_proj.register_forward_hook(partial(self._keep_output, "k")))
                self._hooks.append(attn.module.register_forward_hook(partial(self._attention_rows_hook, i),
                                                                     with_kwargs=True))
        # a pipeline's second stage: generate() chained over the first stage's wrapper, the
        # labels left to the first stage (which gathers them through this one's columns)
        self._wrap_generate(chain=self.upstream is not None)
        if self.upstream is None:
            self._hook_labels()
        self.adapter.install(self)

    def image_token_mask(self, kw: dict[str, Any]) -> torch.Tensor:
        """[B, L] the image placeholders; in a pipeline, the columns of the image tokens the
        vision stage passed on, where it compacted this forward."""
        if self.upstream is not None and self.upstream.visual_columns is not None:
            return self.upstream.visual_columns
        return super().image_token_mask(kw)

    def token_columns(self) -> torch.Tensor | None:
        """[B, L'] the columns of this forward's sequence (-1: padding) the decoder's hidden
        states hold now, for a family that adds per-token inputs between decoder layers
        (Qwen3-VL's DeepStack, see `FamilyAdapter.install`); None while they hold them all."""
        return self._index if self._entered and self.phase in (Phase.PREFILL, Phase.REPLAY) else None

    # -- outer forward: which phase, and the prompt's facts ------------------------------------

    def _outer_hook(self, module, args, kwargs):
        self._filled = False  # a forward that failed after setting it must not tag the next one's cache
        kw = bind_to_kwargs(self._forward, args, kwargs)
        cache = get_cache(kw)
        past = cache_length(cache)
        # a static cache's layers each keep their own length in fixed slots: the mask spans them all
        self._key_slots = static_cache_slots(cache)
        if self._key_slots is None and is_static_cache(cache):
            raise NotImplementedError(
                f"vlm_prune: method {self.config.method!r} needs the slot count of a static cache "
                f"({type(cache).__name__} does not tell it on this transformers release); use the default cache"
            )
        self._sliced = self._cached = None  # per-stage slices of the previous forward
        self._columns = {}
        self._entered = False
        if past > 0:
            state = self._state_of(cache)
            if self._brings_images(kw):
                return self._continue(kw, past, state)
            self.phase = Phase.OFF if state is None else Phase.DECODE
            if state is not None:  # the prompt that filled this cache, which need not be the last one
                self._prompt_length, self.stage_index, self.stage_padded = state.length, state.stage_index, state.stage_padded
            self._decode_start = past  # layer 0 holds every token: past = L + generated so far
            return None
        self._filled = True
        if self._is_replay() and self.stage_index:
            self.phase = Phase.REPLAY
            self._length = kw_length(kw)
            self._index = torch.arange(self._length, device=kw_device(kw)).expand(kw_batch(kw), -1)
            self._ttv = torch.zeros(self._index.shape, device=self._index.device)
            return None
        # in a pipeline, generate()'s prompt length counts the columns the vision stage dropped
        prompt_end = None if self.upstream is not None else self._prompt_end()
        self._prefilled_in_generate = self._in_generate
        mask = kw.get("attention_mask")
        if _is_prepared(mask):  # generate() with a static cache: the padding behind its 4D mask
            mask = _padding_mask(mask, kw_length(kw))
        self._start_prefill(kw, mask, prompt_end)
        return None

    def _continue(self, kw: dict[str, Any], past: int, state: LLMPromptState | None):
        """A prompt with images on a non-empty cache (a later chat turn brings a new image): a
        prefill of its tokens whose layers also attend to what their cache holds (`state`: what
        filled it, None for a cache no pruned prefill filled); the cache then carries one state
        of the whole conversation."""
        self._refuse_continuation(static_cache=self._key_slots is not None)
        prompt_end = self._prompt_end(past)
        self._prefilled_in_generate = self._in_generate
        n_new, mask = kw_length(kw), kw.get("attention_mask")
        if mask is not None and mask.shape[-1] != past + n_new:
            raise ValueError(
                f"attention_mask has {mask.shape[-1]} columns; expected {past + n_new} (the cache's "
                f"{past} tokens + {n_new} new ones)"
            )
        if state is None:  # nothing pruned so far: every layer holds every cached column
            columns = torch.arange(past, device=kw_device(kw)).expand(kw_batch(kw), past)
            keys, padded = [columns] * len(self.stages), [False] * len(self.stages)
        else:
            keys = [_extend(index, past, state.length) for index in state.stage_index]
            padded = list(state.stage_padded)
        self._filled = True
        self._start_prefill(kw, None if mask is None else mask[:, past:], prompt_end)
        if self.phase == Phase.PREFILL:
            self._cached = CachedColumns(past, keys, padded, None if mask is None else mask[:, :past])
        return None

    def _start_prefill(self, kw: dict[str, Any], mask: torch.Tensor | None, prompt_end: int | None) -> None:
        """The prompt's facts, and the scores and indices the stages start from."""
        self.stage_index, self.merge_plan = [], []
        self.layer_lengths = self._lengths = []  # published as this call fills it
        is_image = self.image_token_mask(kw)
        counts = is_image.sum(1).tolist()
        if not any(counts):
            self.phase, self.prompt = Phase.OFF, None
            self.stats = [{"visual_tokens": int(n), "kept": int(n)} for n in counts]
            self.kept_indices, self.timings = [], {}
            return
        self.phase = Phase.PREFILL
        self.prompt = _prompt_context(is_image, mask, counts, prompt_end)
        self._select_s = 0.0
        self._ttv = torch.zeros(is_image.shape, dtype=torch.float32, device=is_image.device)
        self._attention: torch.Tensor | None = None
        self._index = torch.arange(is_image.shape[1], device=is_image.device).expand_as(is_image)
        # on the host, kept current through the stages: tokens of each image still present,
        # columns of each row (so the stages need no device read to size their outputs)
        self._present = list(self.prompt.image_sizes)
        self._row_len = [is_image.shape[1]] * is_image.shape[0]
        self.stage_padded, self._padded_now = [], False

    # -- decoder layers ------------------------------------------------------------------------

    def _kept_labels(self, labels: torch.Tensor) -> torch.Tensor:
        # the last layer's columns (prefill, or a replay's prompt + generated tokens)
        return labels if self.phase == Phase.OFF else _gather(labels.to(self._index.device), self._index, -100)

    def _cache_state(self) -> LLMPromptState | None:
        if self.phase != Phase.PREFILL or not self.stage_index:
            return None
        if self._cached is not None:
            return self._cached.joined(self.stage_index, self.stage_padded, self.prompt.length, self._stage_layers,
                                       self.renumber)
        return LLMPromptState(self.prompt.length, self.stage_index, self.stage_padded, self._stage_layers,
                              self.renumber)

    def _decodes(self, state: Any) -> bool:
        return (isinstance(state, LLMPromptState) and state.stage_layers == self._stage_layers
                and state.renumbered == self.renumber)

    def _layer_hook(self, i: int, module, args, kwargs):
        """Pre-hook of decoder layer i."""
        if self.phase == Phase.OFF or i < self.first:
            if self.phase == Phase.PREFILL:
                self._lengths.append(args[0].shape[1])
            return None
        hidden = args[0]
        if self.phase in (Phase.PREFILL, Phase.REPLAY) and i in self.stage_starts:
            if self.phase == Phase.PREFILL and self.rows_from_next:
                self._next_layer_rows(i, hidden, kwargs)
            hidden = self._enter_stage(self.stage_starts[i], hidden)
        if i in self.recurrent:
            # decode steps: the state holds the stage's tokens already; the new tokens are never padding
            kwargs = kwargs if self.phase == Phase.DECODE else self._recurrent_kwargs(kwargs)
            if self.phase == Phase.PREFILL:
                self._lengths.append(hidden.shape[1])
        elif self.phase == Phase.DECODE:
            kwargs = self._decode_kwargs(kwargs, self._stage_of(i))
        else:
            kwargs = self._layer_kwargs(kwargs)
            if self.phase == Phase.PREFILL:
                self._lengths.append(hidden.shape[1])
        return (hidden, *args[1:]), kwargs

    def _stage_of(self, i: int) -> int:
        return sum(1 for stage in self.stages if stage.after_layer <= i) - 1

    def _enter_stage(self, s: int, hidden: torch.Tensor) -> torch.Tensor:
        """Drops tokens before the stage's first layer; returns the sliced hidden states."""
        if self.phase == Phase.PREFILL:
            start = clock(self.model)
            new_index, hidden = self._select(s, hidden)
            self.stage_index.append(new_index)
            self._select_s += clock(self.model) - start
            if s == len(self.stages) - 1:
                self._finish_prefill(new_index)
        else:  # a replay: the prompt's selection, and its merges on this forward's states
            new_index = _extend(self.stage_index[s], self._length, self.prompt.length)
            if self.merge_plan and self.merge_plan[s]:
                hidden = _apply_merges(hidden.clone(), self._index, self.merge_plan[s], self._length)
        self._padded_now = self.stage_padded[s]
        # the sequence's columns: the prompt's at prefill, prompt + generated in a replay
        slots = _slots_of(self._index, new_index, self._length if self.phase == Phase.REPLAY else self.prompt.length)
        self._index, self._entered = new_index, True
        self._ttv = _gather(self._ttv, slots, 0.0)
        return _gather(hidden, slots, 0.0)

    def _select(self, s: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, L_new] original columns kept at stage s, left-padded with -1; the hidden states
        [B, L', D] with the method's merged targets replaced, when it merges)."""
        prompt, index = self.prompt, self._index
        valid = index >= 0
        visual = self._visual_columns()
        image_id = _gather(prompt.image_id, index, -1)
        signals = {"transition": self._ttv}
        if self._attention is not None:
            signals["attention"] = self._attention
        scores = self.method.score(signals, visual, self.config.options)
        budgets = [self.method.budget(s, self.stages, self.config.keep, n) for n in prompt.image_sizes]
        # merged targets per image (0 where the image keeps every token it still has)
        targets = [self.method.contextual(s, self.stages, b, self.config.options) if b < n else 0
                   for b, n in zip(budgets, self._present)]
        chosen = _top_per_image(scores, image_id, [b - t for b, t in zip(budgets, targets)])
        if any(targets):
            chosen, hidden = self._merge(hidden, image_id, chosen, targets)
        keep = valid & (~visual | chosen)
        # each row's length after the stage, on the host: minus the tokens its images drop
        kept = [min(k, n) for k, n in zip(budgets, self._present)]
        dropped = _per_row(prompt.visual_per_row, prompt.image_sizes, [n - k for n, k in zip(self._present, kept)])
        row_len = [length - n for length, n in zip(self._row_len, dropped)]
        self._present, self._row_len = kept, row_len
        self.stage_padded.append(len(set(row_len)) > 1)
        width = max(row_len)
        ranks = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        columns = index.gather(1, ranks)
        slot = torch.arange(width, device=index.device).expand_as(columns)
        shift = width - keep.sum(1)[:, None]
        src = (slot - shift).clamp(min=0)
        return torch.where(slot >= shift, columns.gather(1, src), -1), hidden

    def _merge(self, hidden: torch.Tensor, image_id: torch.Tensor, chosen: torch.Tensor,
               targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The method's contextual tokens (VisionDrop): per image with targets[g] > 0, the tokens
        not `chosen` [B, L'] are merged into targets[g] of them (`method.merge` picks them from
        the scoring layer's keys). Returns (chosen | targets, hidden with the targets' states
        replaced); the plan, in original columns, is kept for replays. One device read per
        image: the merge is per image, as released."""
        hidden, chosen = hidden.clone(), chosen.clone()
        rows = _row_of_images(self.prompt.visual_per_row, self.prompt.image_sizes)
        plan = []
        for image, n_targets in enumerate(targets):
            if not n_targets:
                continue
            row = rows[image]
            slots = (image_id[row] == image).nonzero().flatten()  # the image's tokens present, in order
            candidates = (~chosen[row, slots]).nonzero().flatten()
            picked, joiners, group = self.method.merge(self._keys[row, slots], candidates, n_targets,
                                                       self.config.options)
            index = self._index[row]
            plan.append((row, index[slots[picked]], index[slots[joiners]], group))
            chosen[row, slots[picked]] = True
        self.merge_plan.append(plan)
        return chosen, _apply_merges(hidden, self._index, plan, self.prompt.length)

    def _finish_prefill(self, final_index: torch.Tensor) -> None:
        # stats and kept_indices read the device: made when first asked for, not mid-prefill
        self._outcome = (self.prompt, final_index)
        self.timings = {"select_s": self._select_s}

    @property
    def stats(self) -> list[dict[str, int]]:
        """Per row of the last prefill: visual tokens and how many the last stage kept."""
        self._settle()
        return self._stats

    @stats.setter
    def stats(self, value: list[dict[str, int]]) -> None:
        self._stats, self._outcome = value, None

    @property
    def kept_indices(self) -> list[torch.Tensor]:
        """Per image of the last prefill: the indices of its tokens the last stage kept."""
        self._settle()
        return self._kept_indices

    @kept_indices.setter
    def kept_indices(self, value: list[torch.Tensor]) -> None:
        self._kept_indices, self._outcome = value, None

    def _settle(self) -> None:
        """Turns the last prefill's final index into stats and kept indices (device reads)."""
        outcome = self._outcome  # set (None) by the stats / kept_indices setters from __init__ on
        if outcome is None:
            return
        prompt, final_index = outcome
        kept = torch.zeros_like(prompt.is_image)
        rows = torch.arange(final_index.shape[0], device=final_index.device)[:, None].expand_as(final_index)
        valid = final_index >= 0
        kept[rows[valid], final_index[valid]] = True
        kept &= prompt.is_image
        self.stats = [
            {"visual_tokens": int(n), "kept": int(k)}
            for n, k in zip(prompt.is_image.sum(1).tolist(), kept.sum(1).tolist())
        ]
        self.kept_indices = [kept[prompt.image_id == image].nonzero().flatten()
                             for image in range(len(prompt.image_sizes))]

    def _layer_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Mask, position embeddings and position ids of the tokens this layer sees (prefill
        and no-cache replay): the full sequence's sliced, or renumbered ids and their
        embeddings."""
        index = self._index
        cos, sin = kwargs["position_embeddings"]
        positions = kwargs.get("position_ids")

        def sliced():
            out = {"attention_mask": self._layer_mask(kwargs.get("attention_mask"), index)}
            if self.renumber:
                start = self._cached.length if self._cached is not None else 0
                base = index + start if positions is None else _gather_ids(positions, index)
                dropped = _dropped_before(index)
                if self._cached is not None:  # and every cached token this stage dropped
                    dropped = dropped + self._cached.dropped(len(self.stage_index) - 1)[:, None]
                ids = torch.where(index >= 0, base - dropped, 0)
                out.update(position_ids=ids, position_embeddings=self._rotary(cos, ids))
            else:
                out["position_embeddings"] = (_gather_emb(cos, index), _gather_emb(sin, index))
                if positions is not None:
                    out["position_ids"] = _gather_ids(positions, index)
            return out

        return {**kwargs, **self._per_stage((index, cos, sin, positions, kwargs.get("attention_mask")), sliced)}

    def _recurrent_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A recurrent layer's (prefill and no-cache replay) 2-D padding mask [B, L'] of the
        columns it sees: 0 at the caller's padding and at the stage's -1 slots. Both sit before a
        row's real tokens, so zeroing their inputs keeps them out of the layer's state, as the
        model does for left padding. The model's mask: [B, L] of this forward's columns, or None
        (no padding)."""
        mask = kwargs.get("attention_mask")
        if mask is None and not self._padded_now:
            return kwargs
        keep = self._index >= 0
        if mask is not None:
            keep = keep & _gather(mask.bool(), self._index, False)
        return {**kwargs, "attention_mask": keep.to(torch.long if mask is None else mask.dtype)}

    def _rotary(self, like: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of position ids [B, L'] from the language model's own rotary embedding
        (`like`: a tensor of the dtype and device it returns them in)."""
        return self.decoder.rotary_emb(like, ids)

    def _layer_mask(self, mask, index: torch.Tensor):
        """The mask of a layer that sees the columns `index` of this forward's tokens: among
        them, and (continuing a cache) to what the layer's cache holds before them."""
        cached = self._cached
        if cached is None:
            return self._slice_mask(mask, index, index, padded=self._padded_now)
        s = len(self.stage_index) - 1
        queries = torch.where(index >= 0, index + cached.length, -1)
        keys = torch.cat([cached.columns(s), queries], dim=1)
        # always explicit: the model's own mask is made for layer 0, which holds other columns
        return self._slice_mask(mask, queries, keys, query_offset=cached.length, padded=True,
                                queries_padded=self._padded_now)

    def _decode_kwargs(self, kwargs: dict[str, Any], s: int) -> dict[str, Any]:
        """Decode: this layer's cache holds stage s's prompt columns + every generated token;
        renumbered, the new tokens sit at their positions minus every token stage s dropped."""
        cos = kwargs["position_embeddings"][0]
        n_new = cos.shape[-2]
        total = self._decode_start + n_new
        mask = kwargs.get("attention_mask")
        positions = kwargs.get("position_ids")

        def sliced():
            index = self.stage_index[s]
            keys = _extend(index, total, self._prompt_length)
            queries = torch.arange(self._decode_start, total, device=keys.device).expand(keys.shape[0], n_new)
            out = {"attention_mask": self._slice_mask(mask, queries, keys, query_offset=self._decode_start,
                                                      padded=self.stage_padded[s], queries_padded=False)}
            if self.renumber:
                dropped = self._prompt_length - (index >= 0).sum(1)
                ids = (queries if positions is None else positions) - dropped[:, None]
                out.update(position_ids=ids, position_embeddings=self._rotary(cos, ids))
            return out

        sources = (self.stage_index[s], mask, self._decode_start, total, positions, cos)
        return {**kwargs, **self._per_stage(sources, sliced)}

    def _columns_of(self, name: str) -> torch.Tensor:
        """[B, L'] bool: which columns the current layers see are visual tokens (name
        "visual") or real prompt tokens ("real"); computed once per stage: every transition
        hook of the stage asks."""
        cached = self._columns.get(name)
        if cached is None or cached[0] is not self._index:
            source = self.prompt.is_image if name == "visual" else self.prompt.real
            cached = self._columns[name] = (self._index, _gather(source, self._index, False))
        return cached[1]

    def _visual_columns(self) -> torch.Tensor:
        return self._columns_of("visual")

    def _per_stage(self, sources: tuple, compute) -> dict[str, Any]:
        """`compute()`, or its result for the previous layer when that layer had the same
        `sources` (the same tensors, by identity, and the same ints): every layer of a stage gets
        the model's one mask and position embeddings and the stage's one index, so they are
        sliced once per stage, not once per layer -- on a GPU host each slice is several launches
        and a device read. The cache holds its sources, so no identity can be recycled while it
        is alive; it is dropped at the next forward."""
        cached = self._sliced
        if cached is not None and len(cached[0]) == len(sources) and all(
                a is b or (isinstance(a, int) and a == b) for a, b in zip(cached[0], sources)):
            return cached[1]
        result = compute()
        self._sliced = (sources, result)
        return result

    def _slice_mask(self, mask, queries: torch.Tensor, keys: torch.Tensor, query_offset: int = 0,
                    padded: bool = True, queries_padded: bool | None = None):
        """The layer's 4D mask for query and key columns given as original indices (-1 = pad).

        mask: the model's mask over the full sequence ([B, 1, Q, K] bool or additive float), or
        None (causal, no padding). A padding slot attends only to itself, so no row is empty.
        padded / queries_padded: whether the keys / queries hold -1 slots, known on the host
        (queries_padded None: as the keys).
        """
        pad_q, pad_k = queries < 0, keys < 0
        queries_padded = padded if queries_padded is None else queries_padded
        if mask is None and not padded:
            return None
        q_cols, k_cols = queries.clamp(min=0), keys.clamp(min=0)
        if mask is None:
            allowed = k_cols[:, None, :] <= q_cols[:, :, None]
        else:
            rows = (q_cols - query_offset).clamp(min=0)
            full = mask if mask.dtype == torch.bool else mask == 0
            full = full[:, 0]
            allowed = full.gather(1, rows[:, :, None].expand(-1, -1, full.shape[-1]))
            allowed = allowed.gather(2, k_cols[:, None, :].expand(-1, allowed.shape[1], -1))
        allowed = allowed & ~pad_k[:, None, :]
        if queries_padded:
            eye = torch.eye(allowed.shape[1], allowed.shape[2], dtype=torch.bool, device=allowed.device)
            allowed = torch.where(pad_q[:, :, None], eye, allowed)
        if self._key_slots is not None and allowed.shape[-1] < self._key_slots:
            # a static cache: the layer's slots past the tokens it holds are empty
            allowed = torch.nn.functional.pad(allowed, (0, self._key_slots - allowed.shape[-1]), value=False)
        allowed = allowed[:, None]
        if mask is not None and mask.dtype != torch.bool:
            return torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device).masked_fill(
                ~allowed, torch.finfo(mask.dtype).min)
        if self.decoder.attn_implementation() == "eager":
            return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return allowed

    # -- signals ---------------------------------------------------------------------------

    def _transition_hook(self, module, args, kwargs, output):
        """After a sub-module (attention or MLP) of a scored layer: its tokens' transition, the
        softmax over the row's visual tokens or over all its real tokens (`ttv_domain`)."""
        if self.phase != Phase.PREFILL:
            return
        start = clock(self.model)
        t_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        t_out = output[0] if isinstance(output, tuple) else output
        domain = self._columns_of("visual" if self.ttv_domain == "visual" else "real")
        self._ttv = self._ttv + transition_variation(
            t_in, t_out, domain, self.config.options["direction"], self.config.backend)
        self._select_s += clock(self.model) - start

    def _keep_output(self, name: str, module, args, output):
        if self.phase == Phase.PREFILL:
            setattr(self, f"_{name}", output)

    def _attention_rows_hook(self, i: int, module, args, kwargs, output):
        """After the attention of the last layer before a stage (attention_layer "own"): the
        rows' attention to every token, from that layer's q/k."""
        if self.phase != Phase.PREFILL:
            return
        start = clock(self.model)
        cos, sin = kwargs["position_embeddings"]
        self._attention = self._rows_attention(self.decoder.layers[i].attention, partial(_rows_of, self._q), self._k,
                                               cos, sin, kwargs, cache_updated=True)
        self._select_s += clock(self.model) - start

    def _next_layer_rows(self, i: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """Before stage-start layer i drops tokens (attention_layer "next", TransPrune's
        release): the rows' attention from layer i's input_layernorm, q_proj and k_proj applied
        to `hidden` (the sequence before the drop) at the positions the previous layers used."""
        start = clock(self.model)
        if self.stage_index:  # the previous stage's layers' embeddings (cached by _per_stage)
            cos, sin = self._layer_kwargs(kwargs)["position_embeddings"]
        else:  # no stage yet: the model's own
            cos, sin = kwargs["position_embeddings"]
        layer = self.decoder.layers[i]
        attn = layer.attention
        with torch.no_grad():
            normed = layer.input_layernorm(hidden)
            queries = lambda slots: attn.q_proj(_rows_of(normed, slots))  # noqa: E731 -- only the rows' queries
            self._attention = self._rows_attention(attn, queries, attn.k_proj(normed), cos, sin, kwargs,
                                                   cache_updated=False)
        self._select_s += clock(self.model) - start

    def _rows_attention(self, attn: AttentionParts, queries, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        kwargs: dict[str, Any], cache_updated: bool) -> torch.Tensor:
        """[B, L'] the attention the method's rows pay every token the current layers see.

        queries(slots [B, R]) -> [B, R, H * Dh] and k [B, L', G * Dh]: projections of the rows'
        and of all those tokens by the attention layer `attn` (its per-head q/k norms and RoPE
        not applied: they are here); cos, sin:
        their position embeddings; kwargs: the layer's (its cache, when continuing one:
        `cache_updated` says whether it already holds this forward's keys)."""
        prompt, index = self.prompt, self._index
        batch, length = index.shape
        head_dim = attn.head_dim
        k = attn.k_norm(k.view(batch, length, -1, head_dim)).transpose(1, 2)
        groups = None
        if self.rows == "last":
            last_slot = (index == prompt.last[:, None]).float().argmax(1)
            row_slots, row_valid = last_slot[:, None], torch.ones(batch, 1, dtype=torch.bool, device=index.device)
        elif self.rows == "visual":  # each image's own tokens; a column is averaged over its image's rows
            visual = self._visual_columns()
            width = max(1, max(_per_row(prompt.visual_per_row, prompt.image_sizes, self._present)))
            row_slots = torch.sort((~visual).to(torch.int8), dim=1, stable=True).indices[:, :width]
            row_valid = visual.gather(1, row_slots)
            groups = _gather(prompt.image_id, index, -1)
        else:
            instruction = _gather(prompt.instruction, index, False)
            width = max(1, max(prompt.instruction_per_row))  # instruction tokens are never dropped
            order = torch.sort((~instruction).to(torch.int8), dim=1, stable=True).indices[:, :width]
            row_slots, row_valid = order, instruction.gather(1, order)
        rotary = attn.rotary
        q_rows = attn.q_norm(queries(row_slots).view(batch, row_slots.shape[1], -1, head_dim)).transpose(1, 2)
        cos_rows, sin_rows = _gather_emb(cos, row_slots), _gather_emb(sin, row_slots)
        q_rows, _ = rotary(q_rows, q_rows, cos_rows, sin_rows)
        k, _ = rotary(k, k, cos, sin)
        if "keys" in self.method.needs:  # a merging method's similarity metric
            self._keys = k.mean(1)
        row_cols = index.gather(1, row_slots)
        allowed = (index[:, None, :] <= row_cols[:, :, None]) & (index[:, None, :] >= 0)
        if prompt.mask2d is not None:
            allowed &= _gather(prompt.mask2d.bool(), index, False)[:, None, :]
        n_cached = 0
        if self._cached is not None:  # the rows attend to the cached tokens too
            cached_k, cached_allowed = self._cached_keys(attn, kwargs, length if cache_updated else 0)
            n_cached = cached_k.shape[2]
            k = torch.cat([cached_k.to(k.dtype), k], dim=2)
            allowed = torch.cat([cached_allowed[:, None, :].expand(-1, allowed.shape[1], -1), allowed], dim=2)
        row_group = column_group = None
        if groups is not None:
            row_group = groups.gather(1, row_slots)
            column_group = torch.nn.functional.pad(groups, (n_cached, 0), value=-2)  # cached columns: no image's
        return attention_from_rows(q_rows, k, allowed, row_valid, attn.scaling, row_group, column_group)[:, n_cached:]

    def _cached_keys(self, attn: AttentionParts, kwargs: dict[str, Any], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuing a cache: the keys [B, G, K, Dh] (RoPE applied) that the attention layer
        `attn` held before this forward (`length`: the keys of this forward already in it),
        and which of them [B, K] bool are real tokens."""
        layer = attn.layer_idx
        keys = layer_keys(get_cache(kwargs), layer)
        columns = self._cached.columns(self._stage_of(layer))
        if keys.shape[2] - length != columns.shape[1]:
            raise RuntimeError(
                f"vlm_prune: layer {layer} holds {keys.shape[2] - length} cached keys, expected {columns.shape[1]}")
        allowed = columns >= 0
        if self._cached.mask2d is not None:
            allowed &= _gather(self._cached.mask2d.bool(), columns, False)
        return keys[:, :, : columns.shape[1]], allowed


# -- helpers ---------------------------------------------------------------------------------


def _prompt_context(is_image: torch.Tensor, mask2d: torch.Tensor | None, visual_per_row: list[int],
                    prompt_end: int | None = None) -> PromptContext:
    """The prompt's facts; columns from `prompt_end` on (a draft's candidate tokens, see
    PatchBase._prompt_end) are neither instruction nor the last prompt token."""
    length = is_image.shape[1]
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    per_row = starts.sum(1)
    offsets = torch.cumsum(per_row, 0) - per_row
    image_id = torch.where(is_image, torch.cumsum(starts.long(), 1) - 1 + offsets[:, None], -1)
    image_sizes = torch.bincount(image_id[is_image], minlength=int(per_row.sum())).tolist()
    positions, last_image, real = _prompt_columns(is_image, mask2d, prompt_end)
    instruction = (positions > last_image[:, None]) & real & (last_image[:, None] >= 0)
    last = torch.where(real, positions, -1).max(1).values
    return PromptContext(length, is_image, image_id, image_sizes, instruction, real, last, mask2d, visual_per_row,
                         instruction.sum(1).tolist())


def _apply_merges(hidden: torch.Tensor, index: torch.Tensor, plan: list, length: int) -> torch.Tensor:
    """hidden [B, L', D] (modified in place) with each planned target's state = its own + the
    mean of its joiners' (`merge_states`); the plan's columns are found in `index` [B, L']
    (columns < `length`)."""
    from vlm_prune.methods.visionzip import merge_states

    for row, target_cols, joiner_cols, group in plan:
        slots = _slots_of(index[row:row + 1], torch.cat([target_cols, joiner_cols])[None], length)[0]
        targets, joiners = slots[: len(target_cols)], slots[len(target_cols):]
        merged = merge_states(hidden[row:row + 1], targets[None], joiners[None], group[None])[0]
        hidden[row, targets] = merged.to(hidden.dtype)
    return hidden


def _top_per_image(scores: torch.Tensor, image_id: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """[B, L'] bool: the budgets[i] highest-scoring tokens of each image i (all of them if it has
    fewer), ties to the earlier token in row-major order. scores: [B, L'];
    image_id: [B, L'] int64, -1 where not an image token.

    All images at once and without a device read: tokens sorted by score, then (stably) by
    image, give each token its rank inside its image."""
    n = scores.numel()
    flat_image = image_id.flatten()
    by_score = torch.sort(scores.float().flatten(), descending=True, stable=True).indices
    order = by_score[torch.sort(flat_image[by_score], stable=True).indices]
    group = flat_image[order] + 1  # 0: not an image token
    sizes = torch.zeros(len(budgets) + 1, dtype=torch.long, device=scores.device)
    sizes.scatter_add_(0, group, torch.ones_like(group))
    rank = torch.arange(n, device=scores.device) - (torch.cumsum(sizes, 0) - sizes)[group]
    if len(set(budgets)) <= 1:
        take = (rank < (budgets[0] if budgets else 0)) & (group > 0)
    else:  # one small host-to-device copy when images keep different counts
        limit = torch.tensor([0, *budgets], device=scores.device)
        take = rank < limit[group]
    chosen = torch.zeros(n, dtype=torch.bool, device=scores.device)
    return chosen.index_put_((order,), take).view_as(image_id)


def _gather(x: torch.Tensor, index: torch.Tensor, pad_value) -> torch.Tensor:
    """x [B, L] or [B, L, D] at columns `index` [B, L'] (-1 -> pad_value)."""
    idx = index.clamp(min=0)
    if x.dim() == 3:
        out = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        return out.masked_fill((index < 0)[..., None], pad_value)
    return x.gather(1, idx).masked_fill(index < 0, pad_value)


def _rows_of(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] at slots [B, R] -> [B, R, D]."""
    return x.gather(1, slots[..., None].expand(-1, -1, x.shape[-1]))


def _gather_emb(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Position embeddings [b, L, D] (b in {1, B}) at columns `index` [B, L'] -> [B, L', D]."""
    x = x.expand(index.shape[0], *x.shape[1:])
    return x.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))


def _gather_ids(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Position ids [b, L] (b in {1, B}) at columns `index` [B, L'] -> [B, L']."""
    return x.expand(index.shape[0], x.shape[-1]).gather(1, index.clamp(min=0))


def _dropped_before(index: torch.Tensor) -> torch.Tensor:
    """[B, L'] for kept columns `index` (increasing per row, -1 = pad slots): how many columns
    before each one were dropped (its column minus the kept columns before it)."""
    valid = index >= 0
    return index - (valid.long().cumsum(1) - 1)


def _slots_of(current: torch.Tensor, wanted: torch.Tensor, length: int) -> torch.Tensor:
    """Slot in `current` of each original column in `wanted` (-1 stays -1); columns are < `length`.

    A scatter into a [B, length + 1] lookup whose last column takes the -1 slots: no boolean
    indexing, so no device read (this runs inside the language model's prefill).
    """
    batch, width = current.shape
    lookup = torch.full((batch, length + 1), -1, dtype=torch.long, device=current.device)
    slots = torch.arange(width, device=current.device).expand(batch, width)
    lookup.scatter_(1, torch.where(current >= 0, current, length), slots)
    return torch.where(wanted >= 0, lookup.gather(1, wanted.clamp(min=0)), -1)


def _extend(prompt_index: torch.Tensor, total: int, prompt_length: int) -> torch.Tensor:
    """A stage's prompt columns followed by every column after the prompt, up to `total`."""
    tail = torch.arange(prompt_length, total, device=prompt_index.device).expand(prompt_index.shape[0], -1)
    return torch.cat([prompt_index, tail], dim=1)
