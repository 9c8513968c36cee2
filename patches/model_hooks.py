"""What every patch installs on one model instance, whichever engine (vision_stage.py or
in_llm.py) does the pruning: hooks and wrappers removed exactly, the generate()
wrapper, the KV cache tags and the loss of a forward given labels.

- generate(): marks where a call starts (its first forward is the prompt's prefill, or the
  first forward on a reused cache); refuses chunked prefill of images; notes whether the call
  cuts its input at the cache's length and where the prompt ends (assisted decoding appends
  a draft's candidates to the first forward).
- KV cache tags: a pruned prefill's decisions travel with the cache it filled, as an attribute
  of the cache object (deep copies carry it too): a cache from an earlier prompt decodes with
  its own decisions, and a cache no pruned prefill filled passes through untouched.
- labels: the pruned forward's logits cover the kept columns only; the loss is computed on the
  labels of those columns.
- per-call state: what one call decides and where it is (the prompt's decisions, the phase,
  the flags generate() notes) lives in per-call attributes (`PerCall`): each generate() call has
  its own, made when it starts and dropped when it returns, and each thread its own, so
  generate() calls on one patched model from several threads run at once, each as it would
  alone. The results of the last prefill (`stats`, `kept_indices`, `timings`, `layer_lengths`)
  are published on the patch, whichever thread ran it.
"""

from __future__ import annotations

import enum
import functools
import threading
from typing import Any, Callable

import torch

from vlm_prune.compat import CACHE_KWARGS, causal_lm_loss, pre_encoded
from vlm_prune.config import PruneConfig

# the attribute by which a KV cache filled by a pruned prefill carries that prefill's state
CACHE_STATE = "_vlm_prune_prompt"
# a forward's per-column targets: taken out before the pruned forward, gathered to its columns after
LABEL_KWARGS = ("labels", "shift_labels")


def with_fields(output: Any, **fields: Any) -> Any:
    """A ModelOutput with `fields` set, in the class's field order (setting a field that was None
    on the object itself appends it: `out[0]` / `to_tuple()` would then give another field)."""
    return type(output)(**{**dict(output.items()), **fields})


def _tokens(kw: dict[str, Any]) -> torch.Tensor:
    x = kw.get("input_ids")
    return x if x is not None else kw["inputs_embeds"]


def kw_length(kw: dict[str, Any]) -> int:
    """The sequence length of a forward's keyword arguments (input_ids or inputs_embeds)."""
    return _tokens(kw).shape[1]


def kw_batch(kw: dict[str, Any]) -> int:
    """The batch size of a forward's keyword arguments."""
    return _tokens(kw).shape[0]


def kw_device(kw: dict[str, Any]) -> torch.device:
    """The device of a forward's tokens."""
    return _tokens(kw).device



class Phase(enum.Enum):
    """Where a forward of the in-LLM engine is."""

    OFF = "off"  # nothing pruned (no images, or an unpruned cache)
    PREFILL = "prefill"  # a prompt's forward: the stages drop tokens
    DECODE = "decode"  # new tokens on a pruned cache
    REPLAY = "replay"  # generate(use_cache=False) after its first step: the prompt's selection again


class PerCall:
    """A per-call attribute: read and written on the current call's state -- that of the
    generate() call running in this thread, or this thread's forwards outside one -- so calls
    from several threads, and a generate() call and the forwards around it, never see each
    other's values. `factory` makes the value a call starts with."""

    def __init__(self, default: Any = None, factory: Callable[[], Any] | None = None):
        self.default, self.factory = default, factory

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, patch: Any, owner: type | None = None) -> Any:
        if patch is None:
            return self
        call = patch._call()
        if self.name not in call:
            call[self.name] = self.factory() if self.factory is not None else self.default
        return call[self.name]

    def __set__(self, patch: Any, value: Any) -> None:
        patch._call()[self.name] = value


class PatchBase:
    """Hook and wrapper bookkeeping shared by the vision-stage and in-LLM engines: everything is
    installed on one model instance and removed exactly."""

    # per call (see PerCall): where a generate() call is, and what its forwards hand each other
    _in_generate = PerCall(False)
    _prefilled_in_generate = PerCall(False)
    _filled = PerCall(False)  # set by a prefill's pre-hook, read by the post-hook that tags the cache
    _generate_cuts = PerCall(False)  # see _cuts_at_cache
    _prompt_len = PerCall(None)  # columns of the prompt the current generate() call got
    _labels = PerCall(None)  # see _take_labels

    adapter: Any  # the family adapter (patches/adapters/) the engine was made with

    def __init__(self, model: torch.nn.Module, config: PruneConfig):
        self.model = model
        self.config = config
        self.stats: list[dict[str, int]] = []
        self.kept_indices: list[torch.Tensor] = []
        self.timings: dict[str, float] = {}
        self.layer_lengths: list[int] = []  # tokens each decoder layer saw in the last prefill
        self._hooks: list[Any] = []
        self._wrapped: list[tuple[Any, str, Any]] = []  # (object, attribute, our wrapper)
        # the cache attribute that carries this patch's decisions (a pipeline's in-LLM stage has its own)
        self.cache_attr = CACHE_STATE
        self._calls = threading.local()  # per thread: the current call's state (see PerCall)
        # read once: a transformers config attribute costs microseconds, and the prefill path is
        # host-bound on a GPU
        self._image_token_id = getattr(model.config, "image_token_id", None)
        text_config = getattr(model.config, "text_config", model.config)
        self._text_layers = getattr(text_config, "num_hidden_layers", 0)
        self._pad_id = next((int(c.pad_token_id) for c in (text_config, model.config)
                             if getattr(c, "pad_token_id", None) is not None), 0)

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy / pickle of a patched model: per-thread call state is neither; the copy
        # starts with none
        state = self.__dict__.copy()
        del state["_calls"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._calls = threading.local()

    def _call(self) -> dict[str, Any]:
        """The current call's state: the running generate() call's in this thread, else this
        thread's own (for forwards outside generate())."""
        call = getattr(self._calls, "state", None)
        if call is None:
            call = self._calls.state = {}
        return call

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for owner, name, wrapper in self._wrapped:
            if vars(owner).get(name) is wrapper:
                delattr(owner, name)
        self._wrapped.clear()

    # -- which prefill filled a cache --------------------------------------------------------
    # A pruned prefill's decisions travel with the KV cache it filled, as an attribute of the
    # cache object (deep copies carry it too): decoding a cache of an earlier prompt after
    # another prefill uses that prompt's decisions, and a cache no pruned prefill filled (an
    # unpatched prefill, a text-only prompt) passes through untouched.

    def _cache_state(self) -> Any:
        """What the last prefill decided, as decode steps on its cache need it (None: nothing)."""
        raise NotImplementedError

    def _tag_cache(self, module, args, output):
        """Forward hook of the hooked module: after a prefill, tags the cache it filled."""
        if not self._filled:
            return None
        self._filled = False
        cache = _output_cache(output)
        if cache is not None:
            try:
                setattr(cache, self.cache_attr, self._cache_state())
            except (AttributeError, TypeError) as error:  # untagged, it would decode as unpruned
                raise TypeError(
                    f"vlm_prune: cannot tag the KV cache ({type(cache).__name__}) with what the pruned prefill "
                    "kept; use one of transformers' Cache classes"
                ) from error
        return None

    def _state_of(self, cache: Any) -> Any:
        """The state of the prefill that filled `cache`; None when no pruned prefill did."""
        state = getattr(cache, self.cache_attr, None)
        if state is not None and not self._decodes(state):
            raise ValueError(
                f"vlm_prune: this KV cache was filled by a prefill pruned with another configuration "
                f"(its state: {type(state).__name__}); the current patch is {self.config.method!r}. Decode "
                "it under the patch that filled it, or start a new cache"
            )
        return state

    def _decodes(self, state: Any) -> bool:
        """Whether this patch can decode a cache with this tag (one its engine and layout made)."""
        raise NotImplementedError

    def _wrap(self, owner: Any, name: str, wrapper: Any, chain: bool = False) -> None:
        """Sets `wrapper` as the instance attribute `name` of `owner` (removed with the patch).
        chain: over an instance attribute already set (a pipeline's second stage wrapping the
        first's generate()); otherwise someone else's instance attribute is left alone."""
        if name in vars(owner) and not chain:
            return
        setattr(owner, name, wrapper)
        self._wrapped.append((owner, name, wrapper))

    def _wrap_generate(self, chain: bool = False) -> None:
        """Marks where each generate() call starts (its first forward is the prompt's prefill, or
        the first on a reused cache) and notes what that forward will need: whether generate()
        cuts its input at the cache's length, and where the prompt ends."""
        if not hasattr(self.model, "generate"):
            return
        original = self.model.generate
        # a partial of bound methods, not a closure: copy.deepcopy(model) then binds the copy's
        # wrapper to the copy's patch and the copy's own generate
        generate = functools.partial(self._generate, original)
        generate.__wrapped__ = original
        self._wrap(self.model, "generate", generate, chain)

    def _generate(self, original, *args, **kwargs):
        """The patched instance's generate(): `original` with the call's facts noted, in a state
        of its own (see PerCall), dropped when it returns."""
        _refuse_chunked_prefill(self.model, kwargs)
        outer = getattr(self._calls, "state", None)
        self._calls.state = {}
        try:
            self._in_generate, self._prefilled_in_generate = True, False
            given = _generate_input(args, kwargs)
            self._generate_cuts = _cuts_at_cache(given, kwargs)
            self._prompt_len = given.shape[1] if isinstance(given, torch.Tensor) and given.dim() >= 2 else None
            return original(*args, **self._generate_kwargs(kwargs))
        finally:
            self._after_generate()
            self._calls.state = outer

    def _hook_labels(self) -> None:
        """A forward given `labels`: the logits cover only the columns the pruning kept, so the
        model's own loss (labels of the whole sequence) would fail. The labels are taken out
        before the forward, and the loss is computed after it on the labels of the kept columns
        (those of dropped image tokens go, as their logits did)."""
        self._hooks.append(self.model.register_forward_pre_hook(self._take_labels, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._loss_on_kept, with_kwargs=True))

    def _take_labels(self, module, args, kwargs):
        # set at every forward: a failed one leaves nothing behind (None, not a new empty dict:
        # a compiled decode guards on this attribute)
        if kwargs.get("labels") is None:  # no loss without labels, as unpatched
            self._labels = None
            return None
        self._labels = {key: kwargs[key] for key in LABEL_KWARGS if kwargs.get(key) is not None}
        return args, {k: v for k, v in kwargs.items() if k not in LABEL_KWARGS}

    def _loss_on_kept(self, module, args, kwargs, output):
        """The model's own loss on the kept columns' labels, in the output as the model puts it
        (first field, or first element of a tuple)."""
        given, self._labels = self._labels, None
        if given is None:
            return None
        logits = output[0] if isinstance(output, tuple) else output.logits
        kept = {key: self._labels_of_kept(value, logits) for key, value in given.items()}
        extra = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if kwargs.get(k) is not None}
        if "shift_labels" in kept:  # targets given per position (sequence/context parallel training)
            extra["shift_labels"] = kept["shift_labels"]
        loss = causal_lm_loss(module, logits, kept["labels"], **extra)
        if isinstance(output, tuple):
            return (loss, *output)
        return with_fields(output, loss=loss)

    def _labels_of_kept(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[B, L] labels of the whole input -> [B, L'] those of the columns the forward kept."""
        if labels.shape[-1] != logits.shape[-2]:
            labels = self._kept_labels(labels)
        if labels.shape[-1] != logits.shape[-2]:
            raise ValueError(
                f"vlm_prune: labels cover {labels.shape[-1]} columns but the pruned forward returned logits "
                f"for {logits.shape[-2]}; pass labels for the whole input sequence"
            )
        return labels

    def _kept_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """[B, L] labels of the last forward's input -> [B, L'] those of the columns it kept
        (-100, ignored, where a row was re-padded)."""
        raise NotImplementedError

    def _generate_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments a generate() call passes on (a family may drop some)."""
        return self.adapter.generate_kwargs(kwargs, self._state_of)

    def _after_generate(self) -> None:
        """Called when a generate() call returns (or raises), with its state still current."""

    def _prompt_end(self, cached: int = 0) -> int | None:
        """For the first forward of a generate() call: where the prompt ends among its tokens.
        Assisted decoding (`assistant_model=`) appends the draft's first candidate tokens to that
        forward; they are not part of the instruction a method reads, nor its last token. None:
        all of it is. `cached`: the conversation's columns a reused cache holds, which generate()
        cut off the front of the input it was given."""
        if not self._in_generate or self._prefilled_in_generate or self._prompt_len is None:
            return None
        return self._prompt_len - cached if self._generate_cuts else self._prompt_len

    def _refuse_continuation(self, static_cache: bool) -> None:
        """A prompt with images on a non-empty cache: the cases neither engine continues."""
        if not self.adapter.continues_with_images:
            raise NotImplementedError(
                f"vlm_prune: a prompt with images that continues a non-empty KV cache is not supported on "
                f"{type(self.model).__name__}{self.adapter.continuation_refusal}; start a new cache for that prompt"
            )
        if static_cache:
            raise NotImplementedError(
                "vlm_prune: a prompt with images on a static cache that already holds tokens is not "
                "supported; continue a conversation with the default dynamic cache"
            )

    def _is_replay(self) -> bool:
        """A forward of generate(use_cache=False) after the first: the whole sequence again."""
        return self._in_generate and self._prefilled_in_generate

    def _has_image_inputs(self, kw: dict[str, Any]) -> bool:
        return kw.get("pixel_values") is not None or self._pre_encoded(kw) is not None

    @staticmethod
    def _pre_encoded(kw: dict[str, Any]) -> Any:
        """Image features generate() (or the caller) computed before the forward, or None."""
        return pre_encoded(kw, "image")

    def _brings_images(self, kw: dict[str, Any]) -> bool:
        """Whether a forward's tokens hold image placeholders with their images (a device read,
        only when images are given)."""
        return self._has_image_inputs(kw) and bool(self.image_token_mask(kw).any())

    def image_token_mask(self, kw: dict[str, Any]) -> torch.Tensor:
        """[B, L] bool: the image placeholders, from input_ids or by comparing embeddings."""
        return self.token_mask(kw, self._image_token_id)

    def token_mask(self, kw: dict[str, Any], token_id: int) -> torch.Tensor:
        """[B, L] bool: the placeholders of `token_id`, from input_ids or by comparing embeddings."""
        if kw.get("input_ids") is not None:
            return kw["input_ids"] == token_id
        embed = self.adapter.embedding()
        image_embed = embed(torch.tensor([[token_id]], device=kw["inputs_embeds"].device))
        return (kw["inputs_embeds"] == image_embed).all(-1)



def _refuse_chunked_prefill(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """generate(prefill_chunk_size=...) runs the prompt in pieces, each seeing part of an image's
    tokens: no method can choose among tokens it does not see together."""
    if kwargs.get("pixel_values") is None and kwargs.get("pixel_values_videos") is None:
        return
    chunk = kwargs.get("prefill_chunk_size")
    if chunk is None:
        config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        chunk = getattr(config, "prefill_chunk_size", None)
    if chunk is not None:
        raise NotImplementedError(
            f"vlm_prune: generate() with prefill_chunk_size={chunk} runs the prompt in pieces, and a "
            "pruning method has to see each image's tokens together; pass prefill_chunk_size=None "
            "(the pruned prompt is shorter anyway)"
        )


def _generate_input(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The token ids (or embeddings) a generate() call was given."""
    given = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    return given if given is not None else kwargs.get("inputs_embeds")


def _cuts_at_cache(given: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a generate() call with a non-empty cache passes on its input from the cache's
    length (it was given the whole sequence), not all of it (only the new tokens were given,
    with a mask of the whole sequence): transformers' rule, which reads the mask before
    generate() drops an all-ones one."""
    mask = kwargs.get("attention_mask")
    if not isinstance(given, torch.Tensor) or given.dim() != 2 or mask is None:
        return True  # inputs_embeds are always cut; a mask generate() makes has the ids' length
    return mask.shape[-1] == given.shape[-1]


def _output_cache(output: Any) -> Any:
    """The KV cache a model forward returned (`cache` from transformers 5.2x, else
    `past_key_values`), or None."""
    for name in CACHE_KWARGS:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def _per_row(row_tokens: list[int], image_tokens: list[int], image_values: list[int]) -> list[int]:
    """Sums a per-image count over each row's images, on the host: the images fill the rows'
    placeholders in order (`row_tokens`: placeholders per row; `image_tokens`: per image)."""
    sums = [0] * len(row_tokens)
    for row, value in zip(_row_of_images(row_tokens, image_tokens), image_values):
        sums[row] += value
    return sums


def _row_of_images(row_tokens: list[int], image_tokens: list[int]) -> list[int]:
    """The row of each image, on the host (the same filling as `_per_row`)."""
    rows, row, seen = [], 0, 0
    for n in image_tokens:
        while row < len(row_tokens) and seen >= row_tokens[row]:
            row, seen = row + 1, 0
        rows.append(row)
        seen += n
    return rows


def _is_prepared(mask: Any) -> bool:
    """A mask the model would otherwise build itself: [B, 1, q, S], or one per attention kind."""
    return isinstance(mask, dict) or (mask is not None and mask.dim() == 4)


def _padding_mask(mask: torch.Tensor | dict, length: int) -> torch.Tensor | None:
    """[B, 1, L, S] (or {kind: such a mask or None}) -> [B, L] long: the padding mask behind the
    mask generate() prepares for a static cache (bool, or additive float with 0 where attended),
    left or right padding; None where generate() made none (no padding)."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values())))
    if mask is None:  # generate() prepares no mask for a batch without padding
        return None
    # the last prompt token's row: causal, it sees every real token before it, and with right
    # padding it is a padding query that still sees them (padding is masked as keys)
    last = mask[:, 0, -1, :length]
    real = last if last.dtype == torch.bool else last == 0
    return real.long()


def _prompt_columns(is_image: torch.Tensor, mask2d: torch.Tensor | None,
                    prompt_end: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a prompt's [B, L] image-placeholder mask: the [B, L] column numbers, each row's last
    image column [B] (-1: none), and the [B, L] bool real prompt tokens -- not padding, and
    before `prompt_end` (a draft's candidates follow it, see PatchBase._prompt_end)."""
    batch, length = is_image.shape
    positions = torch.arange(length, device=is_image.device).expand(batch, length)
    last_image = torch.where(is_image, positions, -1).max(1).values
    real = mask2d.bool() if mask2d is not None else torch.ones_like(is_image)
    if prompt_end is not None and prompt_end < length:
        real = real & (positions < prompt_end)
    return positions, last_image, real
