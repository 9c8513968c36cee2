"""A compiled language model for the vision-stage methods: `vlm_prune.compile_language_model`.

    handle = vlm_prune.patch(model, "cls_attention", keep=64)
    compiled = vlm_prune.compile_language_model(model)       # buckets (64, ..., 2048), CUDA graphs on a GPU
    model.generate(**inputs, max_new_tokens=30)              # prefill and decode run compiled graphs
    compiled.remove()                                        # or vlm_prune.uncompile_language_model(model)

A vision-stage method compacts the sequence before the language model runs, so the language
model sees an ordinary, shorter prompt. Its length changes from prompt to prompt, which a compiled
graph (and a CUDA graph above all) cannot follow: each new length would be a new graph. This
module wraps the instance's language model (`model.model.language_model`) so that

- a prefill (a prompt on an empty static cache, or a forward without a cache) is right-padded to
  the next length of a small set of buckets and runs the graph compiled for that bucket: every
  length in a bucket reuses it. The padding columns come after every real token, so causal
  attention keeps them out of every real token's output; the attention mask hides them from the
  padding rows' keys too, their position ids continue the real ones (any finite values would
  do), and the hidden states of the real columns are returned. Inside the graph the prompt
  attends over the bucket's columns only (not over all the static cache's slots), and its keys
  and values are then copied into the static cache's first slots; the cache's length is set to
  the real length after the graph (in place, no device read): the first decode step overwrites
  the first padding slot, and the slots beyond it are masked as future positions until they are
  overwritten in turn;
- a decode step (one token on a static cache) runs one graph for every step: the cache's slots
  are fixed, the 2D mask is widened to all of them.

The LM's own inputs are used as they come: the position ids the vision-stage engine computed
(renumbered or original, Qwen's M-RoPE planes [3 or 4, B, L]), its compacted 2D mask (or the 4D
mask generate() prepares for a static cache, read back to 2D). Nothing here reads the device.

`generate()` then needs a static cache: the helper sets the model's generation config to
`cache_implementation="static"` with `max_cache_len` and `disable_compile=True` (transformers
would otherwise compile the whole forward's decode on top of this), and, with `reuse_cache`,
hands every generate() call the same static cache (reset), so a CUDA graph that captured its
buffers is replayed, not re-recorded. Everything is restored by `remove()`.

Anything else runs the language model uncompiled (counted in `stats["eager"]`): a prompt longer
than the largest bucket (or than the static cache), a prompt on a non-empty cache (a second
turn, assisted decoding's candidates), a dynamic cache, a forward with autograd on, a forward
asking for attentions or hidden states. In-LLM methods (`transition`, `fastv`, `visiondrop`)
change the decoder's sequence between layers and are refused.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import threading
import types
from collections import Counter
from typing import Any, Iterator, Sequence

import torch

from .api import get_handle
from .compat import CACHE_KWARGS, bind_to_kwargs, get_cache, is_static_cache
from .registry import available_methods, get_method

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MODEL_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
_ATTR = "_vlm_prune_compiled"
_EMPTY = "_vlm_prune_empty"  # set on a pooled static cache that was just reset (known empty, no device read)
# keyword arguments of the language model's forward this wrapper passes on (others -> uncompiled)
_KNOWN = frozenset({"input_ids", "inputs_embeds", "attention_mask", "position_ids", "use_cache", "return_dict",
                    "output_attentions", "output_hidden_states", *CACHE_KWARGS})


def vision_stage_methods() -> list[str]:
    """The methods a compiled language model runs with (they prune before the language model)."""
    return [name for name in available_methods() if get_method(name).stage == "vision"]


def compile_language_model(model: torch.nn.Module, buckets: Sequence[int] = DEFAULT_BUCKETS, mode: str | None = None,
                           *, max_cache_len: int | None = None, reuse_cache: bool = True, fullgraph: bool = True,
                           backend: str = "inductor") -> "CompiledLanguageModel":
    """Compiles the language model of a (pruned or unpruned) VLM for prefill and decode, with
    prompts padded to `buckets` so that every prompt length reuses a graph.

    buckets: the padded prefill lengths (a prompt runs at the smallest bucket that holds it; one
        longer than the largest runs uncompiled).
    mode: torch.compile's mode; None = "reduce-overhead" (CUDA graphs) when the language model
        is on a CUDA device, else "default" (on a CPU inductor skips CUDA graphs anyway).
    max_cache_len: slots of the static cache generate() uses (default: largest bucket + 512);
        generate() makes it larger when a call needs more (the decode graph then compiles again).
    reuse_cache: generate() calls share one static cache per thread and batch size (reset at each
        call), so CUDA graphs replay on the same buffers; a cache returned by generate() is then
        valid until the next generate() call of that thread.
    fullgraph, backend: passed to torch.compile (backend "eager" / "aot_eager" to debug).

    The model may be patched with a vision-stage method before or after (or not at all); an
    in-LLM method is refused here and at the first forward under it. Compiling a compiled model
    replaces its settings."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"compile_language_model supports model types {list(MODEL_TYPES)}; got {model_type!r} "
                         f"({type(model).__name__})")
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if language_model is None:
        raise ValueError(f"{type(model).__name__} has no model.language_model; pass the model with the "
                         "language-model head (e.g. LlavaForConditionalGeneration)")
    _check_decoder(model)
    buckets = _check_buckets(buckets)
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {list(MODES)} or None")
    if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len <= buckets[-1]):
        raise ValueError(f"max_cache_len={max_cache_len!r}: must be an int larger than the largest bucket "
                         f"({buckets[-1]})")
    if hasattr(language_model, "_hf_hook") or any(hasattr(m, "_hf_hook") for m in language_model.modules()):
        raise ValueError("compile_language_model: the language model is managed by accelerate (device_map=...); "
                         "load it on one device")
    check_pruning(model)
    previous = getattr(model, _ATTR, None)
    if previous is not None:
        previous.remove()
    handle = CompiledLanguageModel(model, language_model, buckets, mode, max_cache_len, reuse_cache, fullgraph,
                                   backend)
    handle._install()
    setattr(model, _ATTR, handle)
    return handle


def uncompile_language_model(model: torch.nn.Module) -> None:
    """Removes `compile_language_model` from `model` (a no-op if it is not compiled)."""
    handle = getattr(model, _ATTR, None)
    if handle is not None:
        handle.remove()


def get_compiled(model: torch.nn.Module) -> "CompiledLanguageModel | None":
    """The active handle of a model's compiled language model, or None."""
    return getattr(model, _ATTR, None)


def check_pruning(model: torch.nn.Module) -> None:
    """ValueError when the model is patched with a method (or pipeline stage) that prunes inside
    the language model."""
    handle = get_handle(model)
    if handle is None:
        return
    config = handle.config
    stages = getattr(config, "stages", None) or (config,)
    inside = [stage.method for stage in stages if get_method(stage.method).stage != "vision"]
    if inside:
        raise ValueError(
            f"compile_language_model: method {inside[0]!r} prunes inside the language model (its decoder's "
            "sequence changes between layers, which one compiled graph of the language model cannot hold); "
            f"use a vision-stage method: {', '.join(vision_stage_methods())}")


def _check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    try:
        values = list(buckets)
    except TypeError:
        raise ValueError(f"buckets={buckets!r}: give a sequence of positive ints") from None
    if not values or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values):
        raise ValueError(f"buckets={buckets!r}: give a non-empty sequence of positive ints")
    return tuple(sorted(set(values)))


def _check_decoder(model: torch.nn.Module) -> None:
    """Only full-attention decoders: a sliding-window layer's static cache would roll the padding
    columns over real ones."""
    text = model.config.get_text_config(decoder=True)
    types = set(getattr(text, "layer_types", None) or ["full_attention"])
    sliding = getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True)
    if types != {"full_attention"} or sliding:
        raise ValueError(f"compile_language_model: the language model has {sorted(types)} layers "
                         f"(sliding_window={getattr(text, 'sliding_window', None)}); only full-attention decoders "
                         "are supported")


# The compiled callables: two functions, so the prefill's graphs (one per bucket) and the decode's
# are counted apart by dynamo (its graphs and its recompile limit are per code object); each handle
# compiles its own copies (`_own_copy`), so one model's graphs are never tried for another's.
def _prefill_graph(forward, embeds, mask, positions, static, cache_field):
    """The padded prompt through the language model; with a static cache, attention runs over the
    bucket's columns only (a cache the forward makes itself), whose keys and values are then
    copied into the static cache's first slots. Returns the hidden states [B, bucket, D]."""
    if static is None:
        return forward(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                       use_cache=False).last_hidden_state
    out = forward(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    for filled, layer in zip(getattr(out, cache_field).layers, static.layers):
        width = filled.keys.shape[-2]
        layer.keys[:, :, :width].copy_(filled.keys)
        layer.values[:, :, :width].copy_(filled.values)
    return out.last_hidden_state


def _decode_graph(forward, embeds, mask, positions, cache):
    """One step on a static cache (it writes its slot in place). Returns [B, 1, D]."""
    return forward(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **cache,
                   use_cache=True).last_hidden_state


_copies = itertools.count()


def _own_copy(fn):
    """`fn` with a code object of its own (dynamo keeps its compiled graphs on the code object)."""
    name = f"{fn.__name__}_{next(_copies)}"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class CompiledLanguageModel:
    """The compiled language model of one model instance (see the module docstring).

    stats: {"prefill": {bucket: compiled prefills}, "decode": compiled decode steps,
            "eager": forwards run uncompiled}
    last_prefill: {"length": real length, "bucket": padded length} of the last compiled prefill.
    """

    def __init__(self, model, language_model, buckets, mode, max_cache_len, reuse_cache, fullgraph, backend):
        self.model = model
        self.language_model = language_model
        self.buckets = buckets
        device = next(language_model.parameters()).device
        self.mode = mode if mode is not None else ("reduce-overhead" if device.type == "cuda" else "default")
        self.cuda_graphs = self.mode in CUDA_GRAPH_MODES and device.type == "cuda" and backend == "inductor"
        self.max_cache_len = max_cache_len if max_cache_len is not None else buckets[-1] + 512
        self.reuse_cache = reuse_cache
        self.stats: dict[str, Any] = {"prefill": Counter(), "decode": 0, "eager": 0}
        self.last_prefill: dict[str, int] = {}
        self._original = language_model.forward  # the bound forward (or a wrapper someone set before)
        params = inspect.signature(self._original).parameters
        self._cache_kwarg = next((name for name in CACHE_KWARGS if name in params), CACHE_KWARGS[-1])
        from transformers.modeling_outputs import BaseModelOutputWithPast

        # the output's cache field: `cache` from transformers 5.2x, `past_key_values` before
        self._cache_field = next(name for name in CACHE_KWARGS if name in BaseModelOutputWithPast.__dataclass_fields__)
        options: dict[str, Any] = {"dynamic": False, "fullgraph": fullgraph, "backend": backend}
        if backend == "inductor":
            options["mode"] = self.mode
        self._prefill = torch.compile(_own_copy(_prefill_graph), **options)
        self._decode = torch.compile(_own_copy(_decode_graph), **options)
        self._pool: dict[tuple[int, int], Any] = {}  # (thread, batch size) -> static cache
        self._steps: dict[torch.device, torch.Tensor] = {}  # per device: arange(1, largest bucket + 1)
        self._checked: Any = None  # the prune handle last checked (the check runs again when it changes)
        self._paused = False
        self._saved_config: dict[str, Any] = {}
        self._installed: list[tuple[Any, str, Any]] = []

    @property
    def active(self) -> bool:
        return getattr(self.model, _ATTR, None) is self

    def __repr__(self) -> str:
        return (f"CompiledLanguageModel({type(self.model).__name__}, buckets={self.buckets}, mode={self.mode!r}, "
                f"{'active' if self.active else 'removed'})")

    # -- install / remove ---------------------------------------------------------------------

    def _install(self) -> None:
        # per graph function: one graph per bucket and batch size, with and without a cache
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 4 * len(self.buckets) + 16)
        self._set(self.language_model, "forward", functools.partial(self._forward))
        config = getattr(self.model, "generation_config", None)
        if config is not None:
            wanted = {"cache_implementation": "static", "max_cache_len": self.max_cache_len, "disable_compile": True}
            self._saved_config = {key: getattr(config, key, None) for key in wanted}
            for key, value in wanted.items():
                setattr(config, key, value)
        if self.reuse_cache and callable(getattr(self.model, "_prepare_static_cache", None)):
            self._set(self.model, "_prepare_static_cache",
                      functools.partial(self._static_cache_for_generate, self.model._prepare_static_cache))

    def _set(self, owner: Any, name: str, value: Any) -> None:
        setattr(owner, name, value)
        self._installed.append((owner, name, value))

    def remove(self) -> None:
        """Restores the language model's forward and the generation config; idempotent."""
        for owner, name, value in reversed(self._installed):
            if vars(owner).get(name) is value:
                delattr(owner, name)
        self._installed.clear()
        config = getattr(self.model, "generation_config", None)
        for key, value in self._saved_config.items():
            setattr(config, key, value)
        self._saved_config = {}
        self._pool.clear()
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The language model's forwards run uncompiled inside the block (to compare with; the
        generation config stays as compiling set it)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    # -- static caches ------------------------------------------------------------------------

    def static_cache(self, batch_size: int = 1, max_cache_len: int | None = None) -> Any:
        """This thread's pooled static cache for `batch_size` rows (at least `max_cache_len` slots,
        default the handle's), reset: pass it as a forward's `cache=` for a hand-written prefill /
        decode loop. The next generate() call (or this call) of that batch size resets it again."""
        from transformers import StaticCache

        slots = max(max_cache_len or self.max_cache_len, self.max_cache_len)
        key = threading.get_ident(), batch_size
        cache = self._pool.get(key)
        if cache is None or cache.get_max_length() < slots:
            cache = StaticCache(config=self.model.config.get_text_config(decoder=True), max_cache_len=slots)
            self._pool[key] = cache
        return self._reset(cache)

    def _static_cache_for_generate(self, original, *args, **kwargs):
        """generate()'s `_prepare_static_cache`, answered from the pool (the same buffers every call)."""
        try:
            bound = inspect.signature(original).bind(*args, **kwargs).arguments
        except TypeError:
            return original(*args, **kwargs)
        batch, slots = bound.get("batch_size"), bound.get("max_cache_len")
        implementation = bound.get("cache_implementation") or ""
        if (not isinstance(batch, int) or not isinstance(slots, int) or "offloaded" in implementation
                or bound.get("prefill_chunk_size") is not None or self.model.config.is_encoder_decoder):
            return original(*args, **kwargs)
        key = threading.get_ident(), batch
        cache = self._pool.get(key)
        if cache is None or cache.get_max_length() < slots:
            cache = original(*args, **kwargs)
            self._pool[key] = cache
        return self._reset(cache)

    @staticmethod
    def _reset(cache: Any) -> Any:
        """The cache emptied in place: its lengths set to 0 (one op; stale keys stay, masked as
        future positions until overwritten) and the tags of the prefill that filled it dropped."""
        lengths = [layer.cumulative_length for layer in cache.layers
                   if getattr(layer, "is_initialized", False) and isinstance(getattr(layer, "cumulative_length", None),
                                                                              torch.Tensor)]
        if lengths:
            torch._foreach_zero_(lengths)
        for name in [name for name in vars(cache) if name.startswith("_vlm_prune")]:
            delattr(cache, name)
        setattr(cache, _EMPTY, True)
        return cache

    # -- the forward --------------------------------------------------------------------------

    def _forward(self, *args, **kwargs):
        """The language model's forward: a compiled prefill or decode graph, or the original."""
        if self._paused:
            return self._original(*args, **kwargs)
        kw = bind_to_kwargs(self._original, args, kwargs)
        handle = get_handle(self.model)
        if handle is not self._checked:
            check_pruning(self.model)  # a method patched after compiling
            self._checked = handle
        route = self._route(kw)
        if route is None:
            self.stats["eager"] += 1
            out = self._original(*args, **kwargs)
            cache = get_cache(kw)
            if getattr(cache, _EMPTY, False):  # filled uncompiled: no longer known empty
                setattr(cache, _EMPTY, False)
            return out
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = self.language_model.get_input_embeddings()(kw["input_ids"])
        cache = get_cache(kw)
        if route == "decode":
            return self._run_decode(embeds, kw, cache)
        return self._run_prefill(embeds, kw, cache)

    def _route(self, kw: dict[str, Any]) -> str | None:
        """"prefill", "decode" or None (uncompiled)."""
        if torch.is_grad_enabled() or self.language_model.training:
            return None
        if any(value is not None for key, value in kw.items() if key not in _KNOWN):
            return None  # inputs this wrapper does not pad (Qwen3-VL's DeepStack, ...)
        if kw.get("output_attentions") or kw.get("output_hidden_states") or kw.get("return_dict") is False:
            return None
        tokens = kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None else kw.get("input_ids")
        if tokens is None:
            return None
        length = tokens.shape[1]
        cache = get_cache(kw)
        use_cache = kw.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.language_model.config, "use_cache", True)
        mask = kw.get("attention_mask")
        if cache is None:
            return None if use_cache else self._prefill_route(length, None, mask)
        if use_cache is False:
            return None
        if not is_static_cache(cache) or not all(_plain_static(layer) for layer in cache.layers):
            return None
        if length == 1:
            return "decode"
        empty = not cache.layers[0].is_initialized or getattr(cache, _EMPTY, False)
        return self._prefill_route(length, cache, mask) if empty else None

    def _prefill_route(self, length: int, cache: Any, mask: Any) -> str | None:
        bucket = self.bucket(length)
        if bucket is None or (cache is not None and bucket > cache.get_max_length()):
            return None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] != length:
            return None  # a 2D mask of another width than the prompt on an empty cache: left to the model
        return "prefill"

    def bucket(self, length: int) -> int | None:
        """The padded length of a prefill of `length` tokens (None: longer than every bucket)."""
        return next((b for b in self.buckets if b >= length), None)

    def _run_prefill(self, embeds: torch.Tensor, kw: dict[str, Any], cache: Any):
        batch, length = embeds.shape[:2]
        bucket = self.bucket(length)
        pad = bucket - length
        device = embeds.device
        steps = self._steps.get(device)
        if steps is None:
            steps = self._steps[device] = torch.arange(1, self.buckets[-1] + 1, device=device)
        mask = _padding_mask_2d(kw.get("attention_mask"), length)
        if mask is None:
            mask = (steps[:bucket] <= length).expand(batch, bucket)  # real columns, then padding
        else:
            mask = torch.nn.functional.pad(mask.to(device=device, dtype=torch.bool), (0, pad), value=False)
        positions = kw.get("position_ids")
        if positions is None:  # what the language model numbers an empty cache's prompt
            positions = (steps[:bucket] - 1).expand(batch, bucket)
        elif pad:  # the padding continues the numbering (any finite values would do)
            positions = torch.cat([positions, positions[..., -1:] + steps[:pad]], dim=-1)
        if pad:
            embeds = torch.nn.functional.pad(embeds, (0, 0, 0, pad))
        if cache is not None and not cache.layers[0].is_initialized:
            self._initialize(cache, embeds)  # outside the graph: its buffers get static addresses
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        hidden = self._prefill(self._original, embeds, mask, positions, cache, self._cache_field)[:, :length]
        if self.cuda_graphs:
            hidden = hidden.clone()  # the graph's output buffer is overwritten by its next replay
        if cache is not None:
            # the cache was empty: it now holds the real columns (the padding's slots come after
            # them, masked as future positions until the decode steps overwrite them)
            torch._foreach_add_([layer.cumulative_length for layer in cache.layers], length)
            setattr(cache, _EMPTY, False)
        self.stats["prefill"][bucket] += 1
        self.last_prefill = {"length": length, "bucket": bucket}
        return self._output(hidden, cache)

    def _run_decode(self, embeds: torch.Tensor, kw: dict[str, Any], cache: Any):
        slots = cache.get_max_length()
        mask = _padding_mask_2d(kw.get("attention_mask"), slots)
        if mask is not None:
            if mask.shape[-1] > slots:
                self.stats["eager"] += 1
                return self._original(**kw)
            # one width for every step: the slots past the mask's are future positions, masked anyway
            mask = torch.nn.functional.pad(mask.to(dtype=torch.bool), (0, slots - mask.shape[-1]), value=False)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        hidden = self._decode(self._original, embeds, mask, kw.get("position_ids"), {self._cache_kwarg: cache})
        if self.cuda_graphs:
            hidden = hidden.clone()
        setattr(cache, _EMPTY, False)
        self.stats["decode"] += 1
        return self._output(hidden, cache)

    def _output(self, hidden: torch.Tensor, cache: Any) -> Any:
        """The language model's output, as its forward returns it."""
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(**{"last_hidden_state": hidden, self._cache_field: cache})

    def _initialize(self, cache: Any, embeds: torch.Tensor) -> None:
        shape = getattr(self.model, "_get_static_cache_init_shape", lambda: None)()
        if shape is None:
            text = self.model.config.get_text_config(decoder=True)
            heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
            shape = heads, getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        cache.early_initialization(batch_size=embeds.shape[0], num_heads=shape[0], head_dim=shape[1],
                                   dtype=embeds.dtype, device=embeds.device)


def _plain_static(layer: Any) -> bool:
    """A full-attention static layer (a tensor length we can shorten in place)."""
    from transformers.cache_utils import StaticLayer

    return isinstance(layer, StaticLayer) and not getattr(layer, "is_sliding", False)


def _padding_mask_2d(mask: Any, length: int) -> torch.Tensor | None:
    """A forward's mask as [B, length] (2D as given; a 4D mask generate() prepared for a static
    cache read back to its last query row, as the vision-stage engine reads it)."""
    if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return mask
    from .patches.model_hooks import _padding_mask

    return _padding_mask(mask, length)


