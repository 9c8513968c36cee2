"""The family-independent half of a vision-stage patch: prefill, decode and generate() glue.

A family subclass knows one model family: which module to hook, where the image placeholders
are, how to run the vision tower with the method's signals, how to embed tokens and which
position ids the unpruned model would use. This class turns a method's per-image reduction
into a shorter sequence and keeps decode consistent with it:

- prefill (an empty cache): score and reduce each image, compact embeddings, the 2D attention
  mask and position ids before the language model runs (layer 0's cache is built short);
- decode (a non-empty cache): compact the attention mask's prompt columns and shift position
  ids the same way, so new tokens see exactly the pruned cache;
- generate(use_cache=False): every step re-runs the whole sequence; steps after the first
  reuse the prompt's reduction instead of re-scoring a longer sequence.

State lives on this object (one per patched model instance) and is replaced at each prefill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vlm_prune.compat import bind_to_kwargs, cache_length, get_cache
from vlm_prune.config import PruneConfig
from vlm_prune.methods.base import Reduction
from vlm_prune.registry import get_method
from vlm_prune.sequence import Compaction


@dataclass
class ImageTokens:
    """One image's visual tokens as the LLM would receive them.

    features: [N, D] in raster order (after the projector: the LLM's input space).
    grid:     (h, w) of the patch tokens, h * w == N - n_prefix.
    signals:  method signals, each [N - n_prefix] (e.g. "cls_attention").
    n_prefix: leading tokens that are not grid patches (a [CLS] feature); always kept.
    """

    features: torch.Tensor
    grid: tuple[int, int]
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    n_prefix: int = 0


@dataclass
class PromptState:
    """What the prefill decided, reused by decode steps and no-cache generate steps."""

    compaction: Compaction
    keep: torch.Tensor  # [B, L] bool, prompt columns kept
    features: torch.Tensor  # [K_total, D] reduced visual tokens in placeholder order
    prompt_mask: torch.Tensor | None  # [B, L'] compacted mask, None when none is needed


class VisionStagePatch:
    """Base of the family patches for vision-stage methods (see module docstring)."""

    default_positions = "renumber"
    image_input_keys: tuple[str, ...] = ("pixel_values", "mm_encoder_outputs")

    def __init__(self, model: torch.nn.Module, config: PruneConfig):
        method_cls = get_method(config.method)
        if method_cls.stage != "vision":
            raise ValueError(
                f"method {config.method!r} prunes inside the LLM (stage {method_cls.stage!r}); "
                f"{type(self).__name__} supports vision-stage methods"
            )
        self.model = model
        self.config = config
        self.method = method_cls()
        self.positions = config.positions or self.default_positions
        self.state: PromptState | None = None
        self.stats: list[dict[str, int]] = []
        self.kept_indices: list[torch.Tensor] = []
        self.timings: dict[str, float] = {}
        self._hooks: list[Any] = []
        self._in_generate = False
        self._prefilled_in_generate = False
        self._own_generate = None
        self.check_model()

    # -- what a family provides -----------------------------------------------------------

    def check_model(self) -> None:
        """Raise ValueError if this model cannot provide what the method needs."""

    def target_module(self) -> torch.nn.Module:
        """The module whose forward receives input_ids, pixel_values, mask and positions."""
        raise NotImplementedError

    def has_image_inputs(self, kw: dict[str, Any]) -> bool:
        """True when the call carries images (pixels, or features generate() encoded up front)."""
        raise NotImplementedError

    def image_token_mask(self, kw: dict[str, Any]) -> torch.Tensor:
        """[B, L] bool: where the image placeholders are."""
        raise NotImplementedError

    def encode_images(self, kw: dict[str, Any]) -> list[ImageTokens]:
        """Every image's visual tokens and the signals the method needs, in placeholder order."""
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L, D] token embeddings."""
        raise NotImplementedError

    def base_positions(self, kw: dict[str, Any], length: int, past: int = 0) -> torch.Tensor:
        """Position ids the unpruned model would use for `length` new tokens: [B, L]."""
        given = kw.get("position_ids")
        if given is not None:
            return given
        batch = self._batch_size(kw)
        device = self._device(kw)
        return (torch.arange(length, device=device) + past).expand(batch, length)

    @property
    def pad_token_id(self) -> int:
        return 0

    # -- install / remove -----------------------------------------------------------------

    def install(self) -> None:
        module = self.target_module()
        self._forward = module.forward
        self._hooks.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        if hasattr(self.model, "generate") and "generate" not in vars(self.model):
            original = self.model.generate

            def generate(*args, **kwargs):
                self._in_generate, self._prefilled_in_generate = True, False
                try:
                    return original(*args, **kwargs)
                finally:
                    self._in_generate = False

            generate.__wrapped__ = original
            self._own_generate = generate
            self.model.generate = generate

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._own_generate is not None and vars(self.model).get("generate") is self._own_generate:
            del self.model.generate
        self._own_generate = None
        self.state = None

    # -- the hook --------------------------------------------------------------------------

    def _pre_hook(self, module, args, kwargs):
        kw = bind_to_kwargs(self._forward, args, kwargs)
        past = cache_length(get_cache(kw))
        if past > 0:
            if self.has_image_inputs(kw) and bool(self.image_token_mask(kw).any()):
                raise NotImplementedError(
                    "vlm_prune: a prompt with images that continues a non-empty KV cache is not "
                    "supported; start a new cache for each prompt with images"
                )
            if self.state is None:
                return None
            return (), self._decode(kw, past)
        if self._in_generate and self._prefilled_in_generate and self.state is not None:
            return (), self._apply(kw, self.state, self.image_token_mask(kw))
        new_kw = self._prefill(kw)
        self._prefilled_in_generate = self._in_generate
        return None if new_kw is None else ((), new_kw)

    def _prefill(self, kw: dict[str, Any]) -> dict[str, Any] | None:
        start = time.perf_counter()
        self.state = None
        is_image = self.image_token_mask(kw)
        counts = is_image.sum(1).tolist()
        if not self.has_image_inputs(kw) or not any(counts):
            self.stats = [{"visual_tokens": int(n), "kept": int(n)} for n in counts]
            self.kept_indices = []
            self.timings = {}
            return None
        vision_start = time.perf_counter()
        images = self.encode_images(kw)
        vision_s = time.perf_counter() - vision_start
        reductions = self._reduce(images)
        n_slots = sum(img.features.shape[0] for img in images)
        if n_slots != sum(counts):
            raise ValueError(
                f"{sum(counts)} image placeholder tokens in the prompt but the images give "
                f"{n_slots} visual tokens; was the prompt built by the model's processor?"
            )
        slot_keep = torch.cat(
            [_keep_slots(img, red) for img, red in zip(images, reductions)]
        ).to(is_image.device)
        keep = torch.ones_like(is_image)
        keep[is_image] = slot_keep
        mask = kw.get("attention_mask")
        left_padded = mask is None or not bool((mask[:, -1] == 0).any())
        compaction = Compaction.from_keep_mask(keep, left_padded=left_padded)
        features = torch.cat([_with_prefix(img, red) for img, red in zip(images, reductions)])
        need_mask = mask is not None or compaction.needs_mask or (
            self.positions == "original" and not compaction.is_identity
        )
        prompt_mask = None
        if need_mask:
            full = mask if mask is not None else torch.ones_like(is_image, dtype=torch.long)
            prompt_mask = compaction.gather(full, 0)
        self.state = PromptState(compaction, keep, features, prompt_mask)
        new_kw = self._apply(kw, self.state, is_image)
        self.kept_indices = [_image_index(img, red) for img, red in zip(images, reductions)]
        self.stats = [
            {"visual_tokens": int(n), "kept": int(k)}
            for n, k in zip(counts, (is_image & keep).sum(1).tolist())
        ]
        total = time.perf_counter() - start
        self.timings = {"vision_s": vision_s, "select_s": total - vision_s + self._signal_s}
        return new_kw

    def _reduce(self, images: list[ImageTokens]) -> list[Reduction]:
        """Runs the method once per group of images with the same grid (one batched call)."""
        out: list[Reduction | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault((img.grid, img.n_prefix, img.features.shape[0]), []).append(i)
        for (grid, n_prefix, n_tokens), members in groups.items():
            feats = torch.stack([images[i].features[n_prefix:] for i in members])
            signals = {
                name: torch.stack([images[i].signals[name] for i in members])
                for name in self.method.needs
            }
            k = self.config.budget(n_tokens - n_prefix)
            red = self.method.reduce(feats, grid, k, signals, self.config.options)
            if red.index.shape[1] > 1 and not bool((red.index[:, 1:] > red.index[:, :-1]).all()):
                raise RuntimeError(f"method {self.config.method!r} returned unsorted or repeated token indices")
            for j, i in enumerate(members):
                out[i] = Reduction(red.features[j], red.index[j])
        return out

    def _apply(self, kw: dict[str, Any], state: PromptState, is_image: torch.Tensor) -> dict[str, Any]:
        """The language model's inputs for the whole sequence (prompt + tokens generated so far)."""
        comp = state.compaction
        length = is_image.shape[1]
        extra = length - comp.prompt_len
        keep = torch.cat([state.keep, torch.ones_like(state.keep[:, :1]).expand(-1, extra)], dim=1)
        image_slots = comp.gather(is_image & keep, False)
        if kw.get("input_ids") is not None:
            embeds = self.embed(comp.gather(kw["input_ids"], self.pad_token_id))
        else:
            embeds = comp.gather(kw["inputs_embeds"], 0, seq_dim=1)
        embeds = embeds.masked_scatter(image_slots.unsqueeze(-1), state.features.to(embeds.dtype))
        positions = comp.gather(self.base_positions(kw, length), 0)
        if self.positions == "renumber":
            positions = comp.renumber(positions)
        mask = kw.get("attention_mask")
        if mask is not None:
            mask = comp.gather(mask, 0)
        elif state.prompt_mask is not None:
            mask = _extend_mask(state.prompt_mask, extra)
        new_kw = dict(kw)
        new_kw.update(input_ids=None, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        for key in self.image_input_keys:  # the features are in inputs_embeds now
            if key in new_kw:
                new_kw[key] = None
        return new_kw

    def _decode(self, kw: dict[str, Any], past: int) -> dict[str, Any]:
        """A decode step after a pruned prefill: new tokens only, the cache holds the pruned prompt."""
        comp = self.state.compaction
        n_new = self._seq_len(kw)
        generated = past - comp.index.shape[1]  # tokens after the prompt already in the cache
        full_len = comp.prompt_len + generated + n_new
        new_kw = dict(kw)
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.shape[-1] == full_len:
                new_kw["attention_mask"] = comp.gather(mask, 0)
            elif mask.shape[-1] != past + n_new:
                raise ValueError(
                    f"attention_mask has {mask.shape[-1]} columns; expected {full_len} (unpruned "
                    f"sequence) or {past + n_new} (pruned cache + new tokens)"
                )
        elif self.state.prompt_mask is not None:
            new_kw["attention_mask"] = _extend_mask(self.state.prompt_mask, generated + n_new)
        positions = kw.get("position_ids")
        shift = comp.total_dropped.view(*([1] * (self._position_dims() - 2)), -1, 1)
        if positions is not None:  # the caller numbers as in the unpruned sequence
            new_kw["position_ids"] = positions - shift if self.positions == "renumber" else positions
        else:  # numbered from the cache length, i.e. already renumbered
            base = self.base_positions(kw, n_new, past=past)
            new_kw["position_ids"] = base + shift if self.positions == "original" else base
        return new_kw

    # -- small helpers ---------------------------------------------------------------------

    _signal_s = 0.0

    def _position_dims(self) -> int:
        return 2

    @staticmethod
    def _seq_len(kw: dict[str, Any]) -> int:
        x = kw.get("input_ids")
        return (x if x is not None else kw["inputs_embeds"]).shape[1]

    @staticmethod
    def _batch_size(kw: dict[str, Any]) -> int:
        x = kw.get("input_ids")
        return (x if x is not None else kw["inputs_embeds"]).shape[0]

    @staticmethod
    def _device(kw: dict[str, Any]) -> torch.device:
        x = kw.get("input_ids")
        return (x if x is not None else kw["inputs_embeds"]).device


def _keep_slots(image: ImageTokens, reduction: Reduction) -> torch.Tensor:
    """[N] bool over the image's placeholder slots: True where an output token goes."""
    slots = torch.zeros(image.features.shape[0], dtype=torch.bool, device=image.features.device)
    slots[: image.n_prefix] = True
    slots[reduction.index + image.n_prefix] = True
    return slots


def _image_index(image: ImageTokens, reduction: Reduction) -> torch.Tensor:
    """[n_prefix + K] int64: indices into the image's visual tokens of what goes to the LLM."""
    prefix = torch.arange(image.n_prefix, device=reduction.index.device)
    return torch.cat([prefix, reduction.index + image.n_prefix])


def _with_prefix(image: ImageTokens, reduction: Reduction) -> torch.Tensor:
    """[n_prefix + K, D]: the always-kept prefix followed by the method's tokens."""
    return torch.cat([image.features[: image.n_prefix], reduction.features.to(image.features.dtype)])


def _extend_mask(prompt_mask: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], extra)], dim=1)
