"""The vision-stage engine: a method reduces each image's tokens before the LLM runs.

The engine takes a family adapter (patches/adapters/), which knows one model family: which
module to hook, where the image placeholders are, how to describe each image's tokens (grids,
signals), how to embed tokens and which position ids the unpruned model would use. The engine
turns a method's reductions into a shorter sequence and keeps decode consistent with it:

- prefill (an empty cache): reduce each image, compact embeddings, the 2D attention mask and
  position ids before the language model runs (layer 0's cache is built short);
- decode (a non-empty cache): compact the attention mask's prompt columns and shift position
  ids the same way, so new tokens see exactly the pruned cache, with the decisions of the
  prefill that filled that cache (its tag, see model_hooks.py);
- a new generate() call on a pruned cache (a second chat turn): generate() cuts the full
  sequence it is given at the cache's length, which is the pruned one, so the first columns it
  passes on are already in the cache; they are dropped (the unpruned model would get only the
  new tokens);
- a prompt with images on a non-empty cache (a later turn brings a new image): its images are
  reduced as a prefill's, its tokens numbered after the cached ones, and the cache it fills
  gets one compaction of the whole conversation (`CachedPart`, `Compaction.followed_by`);
- generate(use_cache=False): every step re-runs the whole sequence; steps after the first
  reuse the prompt's reduction instead of re-scoring a longer sequence.
- other per-token inputs of the image tokens (Qwen3-VL's DeepStack features,
  `ImageTokens.streams`) are reduced with the tokens and handed to the adapter with the
  columns of the kept visual tokens (`FamilyAdapter.reduced_inputs`), in prefills and replays.

Several vision stages (a pipeline "cls_attention+divprune"): one engine runs them all, each
image reduced by the first stage, then each later stage on what the one before passed on
(`image_tokens.reduce_in_stages`); the prompt is compacted once, to the last stage's tokens.
Every stage has an adapter of its own (its method's signals, its budget policy's regions); the
first stage's adapter is the engine's (`self.adapter`: hooks, positions, embeddings), the others
only capture and describe during the tower's run, each with a scratch dict of its own. The
stages share one position policy; a stage another vision stage follows orders its tokens by the
slot each stands for (its options resolved as under positions="original"), since the next stage
reads the tower's signals at those slots.

The vision tower runs inside the instance's wrapped `get_image_features`, whether the hook calls
it or generate() does before the first forward (transformers >= 5.2x); the wrapper records the
method's signals while the tower runs. State lives on this object (one per patched model
instance) and is replaced at each prefill; what the adapter needs between its hooks within a
call lives in the call's scratch dict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from vlm_prune.compat import (bind_to_kwargs, cache_length, encoded_features, get_cache, pre_encoded,
                              static_cache_slots, without_pre_encoded)
from vlm_prune.config import PruneConfig
from vlm_prune.kernels.compaction import compact_prompt, compacted_inputs
from vlm_prune.registry import get_method
from vlm_prune.sequence import Compaction
from vlm_prune.timing import clock

from .adapters.base import FamilyAdapter, Plan
from .image_tokens import ImageTokens, ReducedImages, VisionStage, _cat, reduce_image_tokens, reduce_in_stages
from .model_hooks import (PatchBase, PerCall, _is_prepared, _padding_mask, _per_row, _prompt_columns, kw_batch, kw_device, kw_length,
                          with_fields)


@dataclass
class PromptState:
    """What the prefill decided, reused by decode steps and no-cache generate steps."""

    compaction: Compaction
    keep: torch.Tensor | None  # [B, L] bool, prompt columns kept; None where no replay can follow
    reduced: ReducedImages | None  # the visual tokens passed on; None once no replay can follow
    prompt_mask: torch.Tensor | None  # [B, L'] compacted mask, None when none is needed
    renumber: bool = True  # kept tokens numbered consecutively (positions="renumber")
    # [B, 1]: what decode positions lose besides the dropped tokens (a family that numbers a
    # reduced image anew, see `reduced_positions`); None: nothing
    extra_shift: torch.Tensor | None = None
    _features: torch.Tensor | None = None

    @property
    def dropped(self) -> int:
        """Prompt columns the cache does not hold (the fewest dropped from any row: rows that
        lost more are re-padded to the same length)."""
        return self.compaction.prompt_len - self.compaction.index.shape[1]

    @property
    def features(self) -> torch.Tensor:
        """[K_total, D] the visual tokens passed on, in placeholder order (made when first read:
        a prefill that copied them from the tower's output never needs them)."""
        if self._features is None:
            self._features = _cat(self.reduced.features)
        return self._features


@dataclass
class CachedPart:
    """The part of a conversation a KV cache holds, which a prompt with images continues."""

    compaction: Compaction  # of the cached prompt (whose generated tokens follow it, all kept)
    length: int  # columns of the unpruned conversation so far
    mask: torch.Tensor  # [B, past] the mask of the cached columns
    full_mask: torch.Tensor | None  # [B, length + new] the caller's unpruned mask, if given so

    def joined(self, new: Any, renumber: bool) -> tuple[PromptState, torch.Tensor]:
        """The state of the cached part and `new` (the new tokens' CompactedPrompt) together, and
        the new tokens' position ids [..., B, L_new'] (renumbered past the cached drops too)."""
        positions = new.positions
        if renumber:
            shift = self.compaction.total_dropped.view(*([1] * (positions.dim() - 2)), -1, 1)
            positions = (positions - shift).clamp(min=0)
        mask = torch.cat([self.mask, new.mask.to(self.mask.dtype)], dim=1)
        state = PromptState(self.compaction.followed_by(self.length, new.compaction), None, None, mask,
                            renumber=renumber)
        return state, positions


class VisionStageEngine(PatchBase):
    """Vision-stage pruning on one model instance, through its family's adapter (see the module
    docstring)."""

    # per call (see model_hooks.PerCall)
    state = PerCall(None)  # PromptState: what the prompt's prefill decided
    _input_compaction = PerCall(None)  # of the last prefill's own tokens (labels)
    _image_outputs = PerCall(None)  # see _return_image_outputs
    _scratch = PerCall(factory=dict)  # what the adapter keeps between its hooks (grid sizes read before the tower...)
    _later_scratch = PerCall(factory=dict)  # the later vision stages' adapters' scratch dicts, by stage
    # per kind ("image", "video"): the wrapped encoder's last output, its per-item tensors
    # then, and their description
    _last_encoded = PerCall(factory=dict)
    _encoding_video = PerCall(False)  # inside the video encoder (Qwen3-VL's calls the image one)
    # in a pipeline: [B, L'] the image columns of the forward this engine compacted, for the next stage
    visual_columns = PerCall(None)

    def __init__(self, model: torch.nn.Module, config: PruneConfig | Sequence[PruneConfig],
                 adapter_cls: type[FamilyAdapter]):
        """config: one vision-stage method's, or the vision stages of a pipeline, in order."""
        configs = (config,) if isinstance(config, PruneConfig) else tuple(config)
        classes = [get_method(c.method) for c in configs]
        for c, method_cls in zip(configs, classes):
            if method_cls.stage != "vision":
                raise ValueError(
                    f"method {c.method!r} prunes inside the LLM (stage {method_cls.stage!r}); "
                    "the vision-stage engine runs vision-stage methods"
                )
            # a method written for some families only names their model_types in `families`
            families = getattr(method_cls, "families", None)
            if families is not None and not set(adapter_cls.model_types) & set(families):
                raise ValueError(
                    f"method {c.method!r} runs on {', '.join(families)} models only; {type(model).__name__} "
                    f"(model_type {getattr(model.config, 'model_type', None)!r}) is not one"
                )
        if len(configs) > 1:
            from vlm_prune.pipeline_config import PipelineConfig

            config = PipelineConfig(configs)  # checks that each later stage can reduce a subset
        super().__init__(model, config)
        methods = [method_cls() for method_cls in classes]
        self.positions = _shared_positions(configs, methods, adapter_cls, model, config.method)
        self.stages: list[_Stage] = []
        for i, (c, method) in enumerate(zip(configs, methods)):
            budget = c.budget or method.default_budget
            # the options `reduce` runs with: "auto" values resolved for this position policy; a
            # stage another vision stage follows keeps each token at the slot it stands for
            order = self.positions if i == len(configs) - 1 else "original"
            run_config = dataclasses.replace(c, options=method.resolve_options(c.options, order))
            adapter = adapter_cls(model, Plan(method, c, run_config, self.positions, budget))
            self.stages.append(_Stage(method, c, run_config, budget, adapter))
        first = self.stages[0]
        self.method, self.run_config, self.budget, self.adapter = first.method, first.run_config, first.budget, \
            first.adapter
        self._backend = configs[0].backend
        self._kept_slots: list[torch.Tensor] | None = None
        self._video_id = self.adapter.video_token_id()  # None: videos pass through unpruned
        self.downstream = None  # a pipeline's in-LLM stage, which gets this engine's compacted forwards

    @property
    def kept_indices(self) -> list[torch.Tensor]:
        """Per image of the last prefill: the indices of the visual tokens passed on."""
        if self._kept_slots is not None:
            self._kept_indices = [slots.nonzero().flatten() for slots in self._kept_slots]
            self._kept_slots = None
        return self._kept_indices

    @kept_indices.setter
    def kept_indices(self, value: list[torch.Tensor]) -> None:
        self._kept_indices, self._kept_slots = value, None

    @property
    def pad_token_id(self) -> int:
        """The id that fills re-padded slots (masked, so any valid id would do)."""
        return self._pad_id

    # -- install / remove -----------------------------------------------------------------

    def install(self) -> None:
        module = self.adapter.target_module()
        self._forward = module.forward
        self._hooks.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._hooks.append(module.register_forward_hook(self._tag_cache))
        self._hooks.append(module.register_forward_hook(self._return_image_outputs))
        owner, name = self.adapter.image_encoder()
        self._wrap(owner, name, self._encoder_wrapper(getattr(owner, name), "image"))
        if self._video_id is not None:
            owner, name = self.adapter.video_encoder()
            self._wrap(owner, name, self._encoder_wrapper(getattr(owner, name), "video"))
        self._wrap_generate()
        self._hook_labels()
        self.adapter.install(self)

    def remove(self) -> None:
        super().remove()
        self.state = self._input_compaction = None
        self._last_encoded = {}

    def token_columns(self) -> torch.Tensor | None:
        """The columns of the forward's sequence the decoder's hidden states hold (see
        `FamilyAdapter.install`): all of them -- the sequence was compacted before the decoder --
        unless a pipeline's in-LLM stage drops more inside it."""
        return None if self.downstream is None else self.downstream.token_columns()

    def _cache_state(self) -> PromptState | None:
        return self.state

    def _decodes(self, state: Any) -> bool:
        return isinstance(state, PromptState)

    def _kept_labels(self, labels: torch.Tensor) -> torch.Tensor:
        comp = self._input_compaction  # of the last prefill's own tokens, not of the cached part
        if comp is not None:
            # the caller's labels, not moved yet: accelerate moves inputs inside forward, after the hook took them
            labels = comp.gather(labels.to(comp.index.device), -100)
        # a pipeline: the in-LLM stage's last layer holds fewer columns still
        return labels if self.downstream is None else self.downstream._kept_labels(labels)

    def _after_generate(self) -> None:
        if self.state is not None:  # replays happen inside one generate() call only
            self.state.reduced = None

    def _encoder_wrapper(self, original, kind: str):
        # a partial of bound methods, not a closure: a deep copy of the model gets its own
        encoder = functools.partial(self._encode_recording, original, inspect.signature(original), kind)
        encoder.__wrapped__ = original  # generate() reads the signature through this
        return encoder

    def _encode_recording(self, original, signature: inspect.Signature, kind: str, *args, **kwargs):
        """The instance's image (or video) encoder, recording the method's signals while it runs."""
        if self._encoding_video:  # the video encoder runs the image one: recorded as the video
            return original(*args, **kwargs)
        call = signature.bind_partial(*args, **kwargs).arguments
        call.update(call.pop("kwargs", {}))
        scratches = [self._scratch_of(i) for i in range(len(self.stages))]
        for stage, scratch in zip(self.stages, scratches):
            stage.adapter.before_tower(call, scratch)
        self._encoding_video = kind == "video"
        try:
            with contextlib.ExitStack() as stack:  # every stage's signals, from the one run of the tower
                signals = [stack.enter_context(stage.adapter.capture_signals(scratch))
                           for stage, scratch in zip(self.stages, scratches)]
                out = original(*args, **kwargs)
        finally:
            self._encoding_video = False
        # a caller's return_dict=False gives a tuple, which no forward of the model consumes
        features = encoded_features(out)
        if features is not None:
            self._last_encoded[kind] = (out, features, [
                _describer(stage.adapter, kind)(out, call, found, scratch)
                for stage, found, scratch in zip(self.stages, signals, scratches)])
        return out

    def _scratch_of(self, stage: int) -> dict[str, Any]:
        """The scratch dict of a stage's adapter in the current call (the first stage's is the
        engine's own)."""
        return self._scratch if stage == 0 else self._later_scratch.setdefault(stage, {})

    # -- which placeholders: images, and videos where the family prunes them ----------------

    def image_token_mask(self, kw: dict[str, Any]) -> torch.Tensor:
        """[B, L] bool: the placeholders the reduction covers -- images', and videos' where the
        family prunes them."""
        mask = super().image_token_mask(kw)
        return mask if self._video_id is None else mask | self.token_mask(kw, self._video_id)

    def _has_image_inputs(self, kw: dict[str, Any]) -> bool:
        return super()._has_image_inputs(kw) or self._has_videos(kw)

    def _has_videos(self, kw: dict[str, Any]) -> bool:
        return self._video_id is not None and (kw.get("pixel_values_videos") is not None
                                               or pre_encoded(kw, "video") is not None)

    # -- the hook --------------------------------------------------------------------------

    def _pre_hook(self, module, args, kwargs):
        self._filled = False  # a forward that failed after setting it must not tag the next one's cache
        self._image_outputs = None
        self.visual_columns = None
        kw = bind_to_kwargs(self._forward, args, kwargs)
        cache = get_cache(kw)
        past = cache_length(cache)
        if past > 0:
            state = self._state_of(cache)
            if state is not None and self._in_generate and not self._prefilled_in_generate:
                kw = self._drop_cached_columns(kw, state, past)
            new_kw = self._continue(kw, past, state) if self._brings_images(kw) else (
                None if state is None else self._decode(kw, past, state))
            self._prefilled_in_generate = self._in_generate
            return None if new_kw is None else ((), new_kw)
        self._filled = True  # the output's cache gets this prefill's state (None: nothing pruned)
        if self._is_replay() and self.state is not None:
            return (), self._apply(kw, self.state, self.image_token_mask(kw))
        mask = kw.get("attention_mask")
        if _is_prepared(mask):  # generate() with a static cache
            kw["attention_mask"] = _padding_mask(mask, kw_length(kw))
        new_kw = self._prefill(kw, prompt_end=self._prompt_end())
        self._prefilled_in_generate = self._in_generate
        return None if new_kw is None else ((), new_kw)

    def _continue(self, kw: dict[str, Any], past: int, state: PromptState | None) -> dict[str, Any]:
        """A prompt with images on a non-empty cache (a later chat turn brings a new image): its
        images are reduced as a prefill's are, its tokens numbered after the cached ones, and the
        cache it fills gets one compaction of the whole conversation (`state`: that of the cached
        part, None for a cache no pruned prefill filled)."""
        mask = kw.get("attention_mask")
        self._refuse_continuation(static_cache=_is_prepared(mask))
        if self.downstream is not None:
            raise NotImplementedError(
                "vlm_prune: a prompt with images that continues a non-empty KV cache is not supported under a "
                "pipeline; start a new cache for that prompt")
        n_new, device = kw_length(kw), kw_device(kw)
        if state is None:  # nothing pruned so far: every cached column kept
            keep = torch.ones(kw_batch(kw), past, dtype=torch.bool, device=device)
            state = PromptState(Compaction.from_keep_mask(keep, kept_per_row=[past] * keep.shape[0]), None,
                                None, None)
        comp = state.compaction
        length = comp.prompt_len + past - comp.index.shape[1]  # the unpruned conversation so far
        full_mask = None
        if mask is None:
            cached = state.prompt_mask if state.prompt_mask is not None else torch.ones(
                comp.index.shape, dtype=torch.long, device=device)
            cached = _extend_mask(cached, past - cached.shape[1])
        elif mask.shape[-1] == length + n_new:
            full_mask, cached = mask, comp.gather(mask[:, :length], 0)
        elif mask.shape[-1] == past + n_new:
            cached = mask[:, :past]
        else:
            raise ValueError(
                f"attention_mask has {mask.shape[-1]} columns; expected {length + n_new} (unpruned "
                f"conversation) or {past + n_new} (pruned cache + new tokens)"
            )
        if mask is not None:
            kw = {**kw, "attention_mask": mask[:, -n_new:]}
        self._filled = True  # the output's cache gets the joined state
        return self._prefill(kw, CachedPart(comp, length, cached, full_mask), self._prompt_end(length))

    def _drop_cached_columns(self, kw: dict[str, Any], state: PromptState, past: int) -> dict[str, Any]:
        """The first forward of a generate() call on a pruned cache: generate() cut the full
        sequence (earlier turns + new tokens) at the cache's pruned length, so the first
        `state.dropped` columns it passes on are already in the cache. Returns `kw` without them."""
        n_new, dropped = kw_length(kw), state.dropped
        if dropped == 0 or not self._generate_cuts:
            return kw
        if _is_prepared(kw.get("attention_mask")):
            raise NotImplementedError(
                "vlm_prune: a new generate() call on a pruned static cache is not supported; continue "
                "a conversation with the default dynamic cache"
            )
        if n_new <= dropped:
            raise ValueError(
                f"vlm_prune: generate() was given {past + n_new} tokens on a cache that already holds "
                f"{past + dropped} of them (pruned to {past}); append the new turn's tokens"
            )
        kw = dict(kw)
        for key in ("input_ids", "inputs_embeds"):
            if kw.get(key) is not None:
                kw[key] = kw[key][:, dropped:]
        for key in ("position_ids", *self.adapter.sequence_kwargs):
            if kw.get(key) is not None:
                kw[key] = kw[key][..., dropped:]
        return kw

    def _return_image_outputs(self, module, args, output):
        """Forward hook: the vision tower's output of the prefill this forward pruned, in the
        model's output as the unpruned forward returns it (the pruned forward got the kept tokens
        as embeddings, so the model itself has none to return)."""
        encoded, self._image_outputs = self._image_outputs, None
        fields = {f"{kind}_outputs": out for kind, out in (encoded or {}).items()
                  if getattr(output, f"{kind}_outputs", out) is None}
        return with_fields(output, **fields) if fields else None

    def _images(self, kw: dict[str, Any], is_image: torch.Tensor) -> list[list[ImageTokens]]:
        """The forward's images and pruned videos as `ImageTokens`, in placeholder order: per
        vision stage, as that stage's adapter describes them (one list for one method)."""
        self._image_outputs = {}  # returned with the forward's output
        recorded, self._last_encoded = self._last_encoded, {}
        none = [[] for _ in self.stages]
        images = self._encoded(kw, "image", recorded.get("image")) if super()._has_image_inputs(kw) else none
        videos = self._encoded(kw, "video", recorded.get("video")) if self._has_videos(kw) else none
        if not (images[0] and videos[0]):
            return images if images[0] else videos
        # both: the items in the order their placeholders come (a device read, mixed prompts only)
        is_video = self.token_mask(kw, self._video_id)[is_image].tolist()
        return [_in_placeholder_order(i, v, is_video) for i, v in zip(images, videos)]

    def _encoded(self, kw: dict[str, Any], kind: str, last: tuple | None) -> list[list[ImageTokens]]:
        """The forward's images (kind "image") or videos described, per vision stage; last: what
        the wrapped encoder recorded of that kind before the forward (generate() encodes first),
        if anything."""
        out = pre_encoded(kw, kind)
        if out is None:
            out = self.adapter.encode_videos(kw) if kind == "video" else self.adapter.encode(kw)
            last = self._last_encoded.pop(kind, None)
        self._image_outputs[kind] = out
        described = _recorded_images(last, out) if last is not None else None
        if described is None:  # encoded before the patch: no signals were recorded
            described = [_describer(stage.adapter, kind)(out, kw, {}, self._scratch_of(i))
                         for i, stage in enumerate(self.stages)]
        for stage, items in zip(self.stages, described):
            method = stage.method
            missing = method.needs - method.optional_needs - set(items[0].signals if items else ()) - {"question"}
            if missing:
                pixels = "pixel_values_videos" if kind == "video" else "pixel_values"
                raise ValueError(
                    f"method {stage.config.method!r} needs {sorted(missing)} from the vision tower, but the "
                    f"{kind} features were computed before vlm_prune.patch; pass {pixels} instead"
                )
        return described

    def _prefill(self, kw: dict[str, Any], earlier: CachedPart | None = None,
                 prompt_end: int | None = None) -> dict[str, Any] | None:
        """Reduces the images of the tokens in `kw` and compacts them. `earlier`: the cached part
        of the conversation these tokens continue (see _continue); `prompt_end`: where the
        prompt ends among these tokens (PatchBase._prompt_end), None: at their end."""
        start = clock(self.model)
        self.state = self._input_compaction = None
        if self.downstream is not None and prompt_end is not None and prompt_end < kw_length(kw):
            raise NotImplementedError(
                "vlm_prune: assisted decoding (assistant_model=) is not supported under a pipeline")
        is_image = self.image_token_mask(kw)
        counts = is_image.sum(1).tolist()
        if not self._has_image_inputs(kw) or not any(counts) or self._malformed(kw, sum(counts)):
            return self._unpruned(counts, is_image.shape[1])
        scratches = [self._scratch_of(i) for i in range(len(self.stages))]
        for stage, scratch in zip(self.stages, scratches):
            scratch["signal_s"] = 0.0
            # before the tower: what reads the device here (Qwen's M-RoPE index) then waits for
            # nothing, and everything after the tower is queued without a single device read
            stage.adapter.prepare(kw, scratch)
        given = kw.get("position_ids")
        positions_start = clock(self.model)
        if earlier is not None:  # numbered after the cached part, as the unpruned model would
            base = given if given is not None else self.adapter.decode_positions(kw, earlier.length, earlier.full_mask)
        elif given is None and self.adapter.sequential_positions:
            base = None
        else:
            base = self.adapter.base_positions(kw, is_image.shape[1], self._scratch)
        positions_s = clock(self.model) - positions_start
        vision_start = clock(self.model)
        described = self._images(kw, is_image)  # per vision stage
        images = described[0]
        vision_s = clock(self.model) - vision_start
        if any("question" in stage.method.needs for stage in self.stages):
            self._add_question(kw, is_image, described, prompt_end)
        if sum(img.features.shape[0] for img in images) != sum(counts):
            # malformed input (placeholders and images disagree): the model raises its own error
            return self._unpruned(counts, is_image.shape[1])
        reduced = self._reduce(described)
        row_kept = _per_row(counts, [img.features.shape[0] for img in images], reduced.counts)
        row_len = [is_image.shape[1] - n + k for n, k in zip(counts, row_kept)]
        mask = kw.get("attention_mask")
        # the padding side matters only when rows end up with different lengths
        left_padded = len(set(row_len)) <= 1 or mask is None or not bool((mask[:, -1] == 0).any())
        # an explicit mask is needed for re-padded rows, and for kept original positions with gaps
        need_mask = mask is not None or earlier is not None or len(set(row_len)) > 1 or (
            self.positions == "original" and any(n != is_image.shape[1] for n in row_len))
        if reduced.source is not None:  # the kept rows are copied straight from the tower's output
            features, kept_visual = reduced.source, reduced.source_keep
        else:
            features, kept_visual = _cat(reduced.features), _cat(reduced.kept)
        out = compact_prompt(
            is_image, kept_visual, features, row_len, left_padded, self.adapter.embedding(), kw.get("input_ids"),
            kw.get("inputs_embeds"), self.pad_token_id, base, self.positions == "renumber", mask, need_mask,
            features_per_placeholder=reduced.source is not None, backend=self._backend)
        self._input_compaction = out.compaction
        if earlier is None:
            # the kept tokens are read again only by the replays of generate(use_cache=False); held
            # until then, since with the tower's output as their source that is a large tensor
            self.state = PromptState(out.compaction, out.keep, reduced if self._in_generate else None, out.mask,
                                     renumber=self.positions == "renumber")
            positions, self.state.extra_shift = self.adapter.reduced_positions(
                out.positions, out.compaction, is_image, mask, images, self._scratch)
            new_kw = self._inputs(kw, out.embeds, positions, out.mask, out.compaction)
        else:
            self.state, positions = earlier.joined(out, self.positions == "renumber")
            new_kw = self._inputs(kw, out.embeds, positions, self.state.prompt_mask, out.compaction)
        new_kw = self._with_streams(new_kw, reduced.streams, out.compaction, is_image, out.keep)
        self._hand_on(kw, out.compaction, out.keep)
        self._kept_slots = reduced.kept  # turned into indices only when asked for (a device read each)
        n_layers = self._text_layers
        self.layer_lengths = [new_kw["inputs_embeds"].shape[1]] * n_layers
        self.stats = [{"visual_tokens": int(n), "kept": int(k)} for n, k in zip(counts, row_kept)]
        sizes = [img.features.shape[0] for img in images]
        if len(self.stages) > 1:  # what each vision stage passed on
            per_stage = [_per_row(counts, sizes, stage_counts) for stage_counts in reduced.stage_counts]
            for row, kept in zip(self.stats, zip(*per_stage)):
                row["kept_per_stage"] = tuple(int(k) for k in kept)
        if any(img.video for img in images):  # of which video tokens
            video_tokens = _per_row(counts, sizes, [n if img.video else 0 for n, img in zip(sizes, images)])
            video_kept = _per_row(counts, sizes, [k if img.video else 0 for k, img in zip(reduced.counts, images)])
            for row, n, k in zip(self.stats, video_tokens, video_kept):
                row.update(video_tokens=int(n), video_kept=int(k))
        total = clock(self.model) - start
        # the scoring hooks run inside the tower's forward: their time belongs to selection
        signal_s = sum(scratch.get("signal_s", 0.0) for scratch in scratches)
        self.timings = {"vision_s": vision_s - signal_s, "select_s": total - vision_s + signal_s,
                        "positions_s": positions_s}
        for i, seconds in enumerate(reduced.stage_s, 1):  # of select_s: each vision stage's reduction
            self.timings[f"stage{i}_s"] = seconds
        return new_kw

    def _unpruned(self, counts: list[int], length: int) -> None:
        """A prefill that prunes nothing (no images, or a malformed input the model itself then
        refuses with its own error, as unpatched)."""
        self.stats = [{"visual_tokens": int(n), "kept": int(n)} for n in counts]
        self.kept_indices, self.timings = [], {}
        self.layer_lengths = [length] * self._text_layers
        return None

    def _malformed(self, kw: dict[str, Any], placeholders: int) -> bool:
        """Whether the prompt's image placeholders disagree with its images, where that is known
        before the tower runs (`expected_visual_tokens`); the model then raises its own error."""
        expected = self.adapter.expected_visual_tokens(kw, self._scratch)
        return expected is not None and expected != placeholders

    def expected_visual_tokens(self, kw: dict[str, Any]) -> int | None:
        """How many placeholders the images of a forward need, when known before the tower runs
        (None: checked after it)."""
        return None

    def _add_question(self, kw: dict[str, Any], is_image: torch.Tensor, described: list[list[ImageTokens]],
                      prompt_end: int | None) -> None:
        """context["question"] per image (of each stage's description): the mean input embedding
        of its row's instruction (the text after the row's last image; all of the row's text if
        nothing follows), read before `prompt_end` (see PatchBase._prompt_end)."""
        embeds = self.adapter.embedding()(kw["input_ids"]) if kw.get("input_ids") is not None else kw["inputs_embeds"]
        positions, last_image, real = _prompt_columns(is_image, kw.get("attention_mask"), prompt_end)
        text = real & ~is_image
        after = text & (positions > last_image[:, None])
        instruction = torch.where(after.any(1, keepdim=True), after, text).float()
        question = (embeds.float() * instruction[..., None]).sum(1) / instruction.sum(1, keepdim=True).clamp(min=1)
        rows = is_image.nonzero()[:, 0]  # row of every placeholder slot, in placeholder order
        start = 0
        for items in zip(*described):  # one image as each stage describes it
            for image in items:
                image.context["question"] = question[rows[start]]
            start += items[0].features.shape[0]

    def _reduce(self, described: list[list[ImageTokens]]) -> ReducedImages:
        """The prefill's reduction: one method's, or every vision stage's in turn."""
        if len(self.stages) == 1:
            return reduce_image_tokens(self.method, self.run_config, described[0], self.budget, self.adapter.project)
        stages = [VisionStage(stage.method, stage.run_config, stage.budget) for stage in self.stages]
        return reduce_in_stages(stages, described, self.adapter.project, clock=lambda: clock(self.model))

    def _apply(self, kw: dict[str, Any], state: PromptState, is_image: torch.Tensor) -> dict[str, Any]:
        """The language model's inputs for the whole sequence (prompt + tokens generated so far)."""
        comp = state.compaction
        length = is_image.shape[1]
        extra = length - comp.prompt_len
        keep = state.keep
        if extra:
            keep = torch.cat([keep, torch.ones_like(keep[:, :1]).expand(-1, extra)], dim=1)
            # generated tokens are text even when a model emits the image token id
            is_image = torch.cat([is_image[:, : comp.prompt_len], torch.zeros_like(is_image[:, comp.prompt_len:])], dim=1)
        embeds, positions = compacted_inputs(
            comp, is_image & keep, state.features, self.adapter.embedding(), kw.get("input_ids"), kw.get("inputs_embeds"),
            self.pad_token_id, self.adapter.base_positions(kw, length, self._scratch), self.positions == "renumber")
        positions, _ = self.adapter.reduced_positions(positions, comp, is_image, kw.get("attention_mask"), None,
                                                      self._scratch)
        mask = kw.get("attention_mask")
        if mask is not None:
            mask = state.prompt_mask if not extra and state.prompt_mask is not None else comp.gather(mask, 0)
        elif state.prompt_mask is not None:
            mask = _extend_mask(state.prompt_mask, extra)
        self._hand_on(kw, comp, keep)
        return self._with_streams(self._inputs(kw, embeds, positions, mask, comp), state.reduced.streams, comp,
                                  is_image, keep)

    def _hand_on(self, kw: dict[str, Any], comp: Compaction, keep: torch.Tensor) -> None:
        """In a pipeline: the image columns of the compacted forward, for the in-LLM stage
        (videos pass it untouched, as they pass an in-LLM method alone). keep: [B, T] bool."""
        if self.downstream is None:
            return
        images = super().image_token_mask(kw)[:, :comp.prompt_len]
        # a replay's generated tokens are text, whatever ids the model emitted
        images = torch.nn.functional.pad(images, (0, keep.shape[1] - images.shape[1]))
        self.visual_columns = comp.gather(images & keep, False)

    def _with_streams(self, new_kw: dict[str, Any], streams: list[torch.Tensor], comp: Compaction,
                      is_image: torch.Tensor, keep: torch.Tensor) -> dict[str, Any]:
        """`new_kw` with the images' other token streams (`ImageTokens.streams`, reduced) passed
        on by the family; is_image, keep: [B, T] bool, the uncompacted sequence's visual columns
        and the columns kept (combined only here: a prefill without streams adds no op)."""
        if not streams:
            return new_kw
        return self.adapter.reduced_inputs(new_kw, comp.gather(is_image & keep, False), streams, self._scratch)

    def _inputs(self, kw: dict[str, Any], embeds: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None, comp: Compaction) -> dict[str, Any]:
        """The forward's keyword arguments for the compacted sequence."""
        new_kw = dict(kw)
        new_kw.update(input_ids=None, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        for key in self.adapter.sequence_kwargs:
            value = new_kw.get(key)
            if value is not None:
                if value.shape[-1] < comp.prompt_len:  # assisted decoding: the draft's candidates follow, as text
                    value = torch.nn.functional.pad(value, (0, comp.prompt_len - value.shape[-1]))
                new_kw[key] = comp.gather(value, 0)
        # the image (and pruned video) features are in inputs_embeds now; other modalities pass through
        new_kw["pixel_values"] = None
        new_kw = without_pre_encoded(new_kw, "image")
        if self._video_id is not None:
            new_kw["pixel_values_videos"] = None
            new_kw = without_pre_encoded(new_kw, "video")
        return new_kw

    def _decode(self, kw: dict[str, Any], past: int, state: PromptState) -> dict[str, Any]:
        """A decode step after a pruned prefill: new tokens only, the cache holds the pruned prompt."""
        comp = state.compaction
        state.reduced = None  # a cached decode: no replay of the prompt follows
        n_new = kw_length(kw)
        generated = past - comp.index.shape[1]  # tokens after the prompt already in the cache
        full_len = comp.prompt_len + generated + n_new
        new_kw = dict(kw)
        mask = kw.get("attention_mask")
        full_mask = None
        slots = None
        if _is_prepared(mask):
            # generate() with a static cache hands decode steps a ready [B, 1, q, cache size] mask
            # whose columns are the unpruned sequence's: the model makes its own from the 2D one
            mask = None
            new_kw["attention_mask"] = None
            slots = static_cache_slots(get_cache(kw))
        if mask is not None:
            if mask.shape[-1] == full_len:
                full_mask = mask
                new_kw["attention_mask"] = comp.gather(mask, 0)
            elif mask.shape[-1] != past + n_new:
                raise ValueError(
                    f"attention_mask has {mask.shape[-1]} columns; expected {full_len} (unpruned "
                    f"sequence) or {past + n_new} (pruned cache + new tokens)"
                )
        elif state.prompt_mask is not None:
            # a static cache: a mask over all its slots, one shape for every step (a compiled
            # decode would recompile for each new length)
            extra = slots - state.prompt_mask.shape[1] if slots else generated + n_new
            new_kw["attention_mask"] = _extend_mask(state.prompt_mask, extra)
        positions = kw.get("position_ids")
        if positions is None:  # number them as the unpruned model would
            positions = self.adapter.decode_positions(kw, comp.prompt_len + generated, full_mask)
        if state.renumber:
            shift = comp.total_dropped.view(-1, 1)
            if state.extra_shift is not None:
                shift = shift + state.extra_shift.to(shift.device)
            positions = positions - shift.view(*([1] * (positions.dim() - 2)), -1, 1)
        new_kw["position_ids"] = positions
        return new_kw


@dataclass(frozen=True)
class _Stage:
    """One vision stage of the engine: its method, the user's config and the one `reduce` runs
    with, its budget policy, and the adapter that captures and describes for it."""

    method: Any
    config: PruneConfig
    run_config: PruneConfig
    budget: str
    adapter: FamilyAdapter


def _shared_positions(configs: Sequence[PruneConfig], methods: list[Any], adapter_cls: type[FamilyAdapter],
                      model: torch.nn.Module, name: str) -> str:
    """The one position policy of the engine's vision stages: the one given (all stages that
    name one must name the same), else the first release policy the family allows for every
    stage, else the family's default; ValueError when some stage cannot keep it."""
    allowed = [p for p in adapter_cls.allowed_positions(methods[0])
               if all(p in adapter_cls.allowed_positions(m) for m in methods[1:])]
    given = list(dict.fromkeys(c.positions for c in configs if c.positions is not None))
    if len(given) > 1:
        raise ValueError(f"positions: the vision stages of {name!r} share one position policy; got {given}")
    if given:
        positions = given[0]
    else:
        releases = [m.release_positions for m in methods if m.release_positions is not None]
        positions = next((p for p in releases if p in allowed), adapter_cls.default_positions)
    if positions not in allowed:
        raise ValueError(
            f"positions={positions!r} is not supported on {type(model).__name__} with method "
            f"{name!r}; allowed: {allowed}"
        )
    return positions


def _describer(adapter: FamilyAdapter, kind: str):
    return adapter.describe_videos if kind == "video" else adapter.describe_images


def _in_placeholder_order(images: list[ImageTokens], videos: list[ImageTokens],
                          is_video: list[bool]) -> list[ImageTokens]:
    """Images and videos merged in the order of their placeholders; is_video: per placeholder
    of the forward (row by row), whether it is a video's. Each item's placeholders come
    together (a Qwen3-VL video's frames are separated by text, but by no other item's tokens)."""
    queues = {False: iter(images), True: iter(videos)}
    ordered, slot = [], 0
    while slot < len(is_video):
        item = next(queues[is_video[slot]])
        ordered.append(item)
        slot += item.features.shape[0]
    return ordered


def _recorded_images(last: tuple, given: Any) -> list[list[ImageTokens]] | None:
    """The descriptions (one per vision stage) the encoder wrapper recorded, for the encoder
    output a forward received; None when that output is not the recorded one.

    generate() with num_beams / num_return_sequences > 1 repeats each prompt's images in the
    recorded output itself (its per-image list is replaced by one with the same tensors
    repeated), so the descriptions are re-read in that list's order."""
    recorded, entries, described = last
    if not _same_encoding(recorded, given):
        return None
    position = {id(tensor): i for i, tensor in enumerate(entries)}
    order = [position.get(id(tensor)) for tensor in encoded_features(recorded)]
    if None in order:
        return None
    return [[images[i] for i in order] for images in described]


def _same_encoding(recorded: Any, given: Any) -> bool:
    """Whether the encoder output a forward received is the one the wrapped encoder returned.

    Not always the same object: accelerate's device hooks (`device_map=`, CPU or disk offload)
    rebuild the containers of every forward's inputs, and copy tensors that change device. What
    the wrapper recorded is cleared at every prefill, so the same layout of tensors means the
    same encoding."""
    if recorded is given:
        return True
    from torch.utils._pytree import tree_flatten

    (a, a_spec), (b, b_spec) = tree_flatten(recorded), tree_flatten(given)
    return a_spec == b_spec and all(
        x is y or (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                   and x.dtype == y.dtype) for x, y in zip(a, b))


def _extend_mask(prompt_mask: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], extra)], dim=1)
