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

The vision tower runs inside the instance's wrapped `get_image_features`, whether the hook calls
it or generate() does before the first forward (transformers >= 5.2x); the wrapper records the
method's signals while the tower runs. State lives on this object (one per patched model
instance) and is replaced at each prefill; what the adapter needs between its hooks within a
call lives in the call's scratch dict.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from vlm_prune.compat import (bind_to_kwargs, cache_length, encoded_features, get_cache, pre_encoded,
                              static_cache_slots, without_pre_encoded)
from vlm_prune.config import PruneConfig
from vlm_prune.kernels.compaction import compact_prompt, compacted_inputs
from vlm_prune.registry import get_method
from vlm_prune.sequence import Compaction
from vlm_prune.timing import clock

from .adapters.base import FamilyAdapter, Plan
from .image_tokens import ImageTokens, ReducedImages, _cat, reduce_image_tokens
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
    # per kind ("image", "video"): the wrapped encoder's last output, its per-item tensors
    # then, and their description
    _last_encoded = PerCall(factory=dict)
    _encoding_video = PerCall(False)  # inside the video encoder (Qwen3-VL's calls the image one)
    # in a pipeline: [B, L'] the image columns of the forward this engine compacted, for the next stage
    visual_columns = PerCall(None)

    def __init__(self, model: torch.nn.Module, config: PruneConfig, adapter_cls: type[FamilyAdapter]):
        method_cls = get_method(config.method)
        if method_cls.stage != "vision":
            raise ValueError(
                f"method {config.method!r} prunes inside the LLM (stage {method_cls.stage!r}); "
                "the vision-stage engine runs vision-stage methods"
            )
        # a method written for some families only names their model_types in `families`
        families = getattr(method_cls, "families", None)
        if families is not None and not set(adapter_cls.model_types) & set(families):
            raise ValueError(
                f"method {config.method!r} runs on {', '.join(families)} models only; {type(model).__name__} "
                f"(model_type {getattr(model.config, 'model_type', None)!r}) is not one"
            )
        super().__init__(model, config)
        self.method = method_cls()
        allowed = adapter_cls.allowed_positions(self.method)
        release = self.method.release_positions
        self.positions = config.positions or (release if release in allowed else adapter_cls.default_positions)
        if self.positions not in allowed:
            raise ValueError(
                f"positions={self.positions!r} is not supported on {type(model).__name__} with method "
                f"{config.method!r}; allowed: {list(allowed)}"
            )
        self.budget = config.budget or self.method.default_budget
        # the options `reduce` runs with: "auto" values resolved for this position policy
        self.run_config = dataclasses.replace(config, options=self.method.resolve_options(config.options, self.positions))
        self.adapter = adapter_cls(model, Plan(self.method, config, self.run_config, self.positions, self.budget))
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
        self.adapter.before_tower(call, self._scratch)
        self._encoding_video = kind == "video"
        try:
            with self.adapter.capture_signals(self._scratch) as signals:
                out = original(*args, **kwargs)
        finally:
            self._encoding_video = False
        # a caller's return_dict=False gives a tuple, which no forward of the model consumes
        features = encoded_features(out)
        if features is not None:
            describe = self.adapter.describe_videos if kind == "video" else self.adapter.describe_images
            self._last_encoded[kind] = (out, features, describe(out, call, signals, self._scratch))
        return out

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

    def _images(self, kw: dict[str, Any], is_image: torch.Tensor) -> list[ImageTokens]:
        """The forward's images and pruned videos as `ImageTokens`, in placeholder order."""
        self._image_outputs = {}  # returned with the forward's output
        recorded, self._last_encoded = self._last_encoded, {}
        images = self._encoded(kw, "image", recorded.get("image")) if super()._has_image_inputs(kw) else []
        videos = self._encoded(kw, "video", recorded.get("video")) if self._has_videos(kw) else []
        if not (images and videos):
            return images or videos
        # both: the items in the order their placeholders come (a device read, mixed prompts only)
        is_video = self.token_mask(kw, self._video_id)[is_image].tolist()
        return _in_placeholder_order(images, videos, is_video)

    def _encoded(self, kw: dict[str, Any], kind: str, last: tuple | None) -> list[ImageTokens]:
        """The forward's images (kind "image") or videos described; last: what the wrapped
        encoder recorded of that kind before the forward (generate() encodes first), if anything."""
        out = pre_encoded(kw, kind)
        if out is None:
            out = self.adapter.encode_videos(kw) if kind == "video" else self.adapter.encode(kw)
            last = self._last_encoded.pop(kind, None)
        self._image_outputs[kind] = out
        items = _recorded_images(last, out) if last is not None else None
        if items is None:  # encoded before the patch: no signals were recorded
            describe = self.adapter.describe_videos if kind == "video" else self.adapter.describe_images
            items = describe(out, kw, {}, self._scratch)
        missing = self.method.needs - self.method.optional_needs - set(items[0].signals if items else ()) - {"question"}
        if missing:
            pixels = "pixel_values_videos" if kind == "video" else "pixel_values"
            raise ValueError(
                f"method {self.config.method!r} needs {sorted(missing)} from the vision tower, but the "
                f"{kind} features were computed before vlm_prune.patch; pass {pixels} instead"
            )
        return items

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
        self._scratch["signal_s"] = 0.0
        # before the tower: what reads the device here (Qwen's M-RoPE index) then waits for
        # nothing, and everything after the tower is queued without a single device read
        self.adapter.prepare(kw, self._scratch)
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
        images = self._images(kw, is_image)
        vision_s = clock(self.model) - vision_start
        if "question" in self.method.needs:
            self._add_question(kw, is_image, images, prompt_end)
        if sum(img.features.shape[0] for img in images) != sum(counts):
            # malformed input (placeholders and images disagree): the model raises its own error
            return self._unpruned(counts, is_image.shape[1])
        reduced = self._reduce(images)
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
            features_per_placeholder=reduced.source is not None, backend=self.config.backend)
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
        if any(img.video for img in images):  # of which video tokens
            sizes = [img.features.shape[0] for img in images]
            video_tokens = _per_row(counts, sizes, [n if img.video else 0 for n, img in zip(sizes, images)])
            video_kept = _per_row(counts, sizes, [k if img.video else 0 for k, img in zip(reduced.counts, images)])
            for row, n, k in zip(self.stats, video_tokens, video_kept):
                row.update(video_tokens=int(n), video_kept=int(k))
        total = clock(self.model) - start
        # the scoring hooks run inside the tower's forward: their time belongs to selection
        signal_s = self._scratch.get("signal_s", 0.0)
        self.timings = {"vision_s": vision_s - signal_s, "select_s": total - vision_s + signal_s,
                        "positions_s": positions_s}
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

    def _add_question(self, kw: dict[str, Any], is_image: torch.Tensor, images: list[ImageTokens],
                      prompt_end: int | None) -> None:
        """context["question"] per image: the mean input embedding of its row's instruction
        (the text after the row's last image; all of the row's text if nothing follows), read
        before `prompt_end` (see PatchBase._prompt_end)."""
        embeds = self.adapter.embedding()(kw["input_ids"]) if kw.get("input_ids") is not None else kw["inputs_embeds"]
        positions, last_image, real = _prompt_columns(is_image, kw.get("attention_mask"), prompt_end)
        text = real & ~is_image
        after = text & (positions > last_image[:, None])
        instruction = torch.where(after.any(1, keepdim=True), after, text).float()
        question = (embeds.float() * instruction[..., None]).sum(1) / instruction.sum(1, keepdim=True).clamp(min=1)
        rows = is_image.nonzero()[:, 0]  # row of every placeholder slot, in placeholder order
        start = 0
        for image in images:
            image.context["question"] = question[rows[start]]
            start += image.features.shape[0]

    def _reduce(self, images: list[ImageTokens]) -> ReducedImages:
        return reduce_image_tokens(self.method, self.run_config, images, self.budget, self.adapter.project)

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


def _recorded_images(last: tuple, given: Any) -> list[ImageTokens] | None:
    """The description the encoder wrapper recorded, for the encoder output a forward received;
    None when that output is not the recorded one.

    generate() with num_beams / num_return_sequences > 1 repeats each prompt's images in the
    recorded output itself (its per-image list is replaced by one with the same tensors
    repeated), so the description is re-read in that list's order."""
    recorded, entries, images = last
    if not _same_encoding(recorded, given):
        return None
    described = {id(tensor): image for tensor, image in zip(entries, images)}
    current = [described.get(id(tensor)) for tensor in encoded_features(recorded)]
    return None if None in current else current


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
