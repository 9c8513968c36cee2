"""What a model family offers the pruning engines, and the defaults most families share.

A family adapter is the only code that names a family's transformers internals. The engines
(`patches.vision_stage`, `patches.in_llm`) take one and ask it, per call:

- vision-stage methods: which module's forward to hook and which function runs the vision tower
  (`target_module`, `image_encoder`, `encode`), how each image's tokens are laid out and which
  signals the tower gave (`capture_signals`, `describe_images`), how to embed tokens and project
  tower features (`embedding`, `project`), which position ids the unpruned model would use
  (`base_positions`, `decode_positions`) and how a reduced image is numbered
  (`reduced_positions`); a family whose videos are pruned too names their placeholder and
  encoder (`video_token_id`, `video_encoder`, `encode_videos`, `describe_videos`);
- in-LLM methods: the decoder's layers and their attention parts (`decoder`);
- both: hooks of its own that the engine installs with its own (`install`), and, for a family
  whose language model takes other per-token inputs at the visual tokens besides their
  embeddings (Qwen3-VL's DeepStack: `ImageTokens.streams`), how the reduced ones reach it
  (`reduced_inputs`).

An adapter is made per patched model instance, with the `Plan` the engine resolved (the method,
the resolved options, position and budget policies). Per-call data it needs between two of its
hooks lives in the call's scratch dict the engine hands it, never on the adapter.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from vlm_prune.config import PruneConfig

from ..image_tokens import ImageTokens
from ..model_hooks import kw_batch, kw_device, kw_length


def this_thread_only(hook: Callable) -> Callable:
    """A hook that runs only in the thread that made it: the signal hooks a call puts on the
    (shared) vision tower for the tower's run must not record another thread's tensors."""
    owner = threading.get_ident()

    def guarded(*args, **kwargs):
        if threading.get_ident() == owner:
            return hook(*args, **kwargs)
        return None

    return guarded


@dataclass(frozen=True)
class Plan:
    """What a patch runs: the method, the user's config, the config `reduce` runs with (its
    "auto" options resolved), and the position and budget policies."""

    method: Any
    config: PruneConfig
    run_config: PruneConfig
    positions: str
    budget: str


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class AttentionParts:
    """One decoder layer's attention, as the in-LLM engine reads it."""

    module: torch.nn.Module  # the attention module (forward hooks; its output before the residual)
    q_proj: torch.nn.Module
    k_proj: torch.nn.Module
    head_dim: int
    scaling: float
    layer_idx: int
    rotary: Callable  # (q, k, cos, sin) -> (q, k) with the positions' rotation applied
    # what the layer does to the projections split into heads [..., heads, head_dim] before the
    # rotation (Qwen3's per-head RMS norms); nothing for Llama-style attention
    q_norm: Callable[[torch.Tensor], torch.Tensor] = _unchanged
    k_norm: Callable[[torch.Tensor], torch.Tensor] = _unchanged


@dataclass(frozen=True)
class LayerParts:
    """One decoder layer: the module (pre-hooks), its normed-input attention and its FFN."""

    module: torch.nn.Module
    input_layernorm: torch.nn.Module
    attention: AttentionParts
    mlp: torch.nn.Module


@dataclass(frozen=True)
class DecoderParts:
    """The language model's decoder: its layers, its rotary embedding (position ids -> (cos,
    sin)) and its attention implementation (whether masks must be additive)."""

    layers: list[LayerParts]
    rotary_emb: Callable
    attn_implementation: Callable[[], str]


def llama_style_decoder(language_model: torch.nn.Module) -> DecoderParts:
    """The parts of a Llama-style decoder (Llama, Vicuna, Mistral, Qwen2: `layers[i]` with
    `input_layernorm`, `self_attn.{q,k}_proj`, `mlp`, and the module's `apply_rotary_pos_emb`)."""
    layers = []
    for layer in language_model.layers:
        attn = layer.self_attn
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        layers.append(LayerParts(layer, layer.input_layernorm,
                                 AttentionParts(attn, attn.q_proj, attn.k_proj, attn.head_dim, attn.scaling,
                                                attn.layer_idx, rotary),
                                 layer.mlp))
    return DecoderParts(layers, language_model.rotary_emb, lambda: language_model.config._attn_implementation)


class FamilyAdapter:
    """Base of the family adapters (see the module docstring); defaults for a LLaVA-like model:
    1-D positions, the tower run by the inner model's `get_image_features`."""

    model_types: tuple[str, ...] = ()
    default_positions = "renumber"
    position_policies: tuple[str, ...] = ("renumber", "original")
    # without position_ids the unpruned model numbers each row 0..L-1 (base_positions' default)
    sequential_positions = True
    # kwargs that run along the sequence besides ids/embeds, mask and positions
    sequence_kwargs: tuple[str, ...] = ()
    # whether a prompt with images may continue a non-empty cache (and why not, when it may not)
    continues_with_images = True
    continuation_refusal = ""

    def __init__(self, model: torch.nn.Module, plan: Plan):
        self.model = model
        self.plan = plan
        self.check()

    @classmethod
    def allowed_positions(cls, method: Any) -> tuple[str, ...]:
        """The position policies this family can keep with `method`."""
        return cls.position_policies

    def check(self) -> None:
        """Raise ValueError if this model cannot provide what the method needs."""

    # -- the vision tower --------------------------------------------------------------------

    def target_module(self) -> torch.nn.Module:
        """The module whose forward receives input_ids, pixel_values, mask and positions."""
        return self.model.model

    def image_encoder(self) -> tuple[Any, str]:
        """(object, method name) of the function that runs the vision tower for images."""
        return self.target_module(), "get_image_features"

    def encode(self, kw: dict[str, Any]) -> Any:
        """Calls the (wrapped) image encoder on the forward's pixel inputs; returns its output."""
        raise NotImplementedError

    def describe_images(self, output: Any, call: dict[str, Any], signals: dict[str, Any],
                        scratch: dict[str, Any]) -> list[ImageTokens]:
        """Turns the encoder's output (and its call arguments) into per-image token descriptions."""
        raise NotImplementedError

    def project(self, features: torch.Tensor) -> torch.Tensor | None:
        """Maps pre-projection tokens [..., Dv] to the LLM space; None if the family cannot."""
        return None

    def capture_signals(self, scratch: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Context manager around the tower; yields a dict it fills with raw signals, and adds
        the time it spends computing them to scratch["signal_s"] (scoring, not the tower)."""
        return contextlib.nullcontext({})

    def embedding(self) -> torch.nn.Module:
        """The module that maps token ids [B, L] to embeddings [B, L, D]."""
        return self.target_module().get_input_embeddings()

    def prepare(self, kw: dict[str, Any], scratch: dict[str, Any]) -> None:
        """Called before the vision tower: read the small host-side facts the selection needs
        (grid sizes, say) now, while reading the device waits for nothing."""

    def before_tower(self, call: dict[str, Any], scratch: dict[str, Any]) -> None:
        """Called with the image encoder's arguments just before it runs (in the prefill or in
        generate()'s own call): the place for host-side layout work that reads small inputs."""

    def expected_visual_tokens(self, kw: dict[str, Any], scratch: dict[str, Any]) -> int | None:
        """How many placeholders the images (and pruned videos) of a forward need, when known
        before the tower runs (None: checked after it)."""
        return None

    # -- videos (a family that prunes them: `video_token_id` is not None) -------------------------

    def video_token_id(self) -> int | None:
        """The placeholder id of video tokens, when the family prunes videos (their tokens then
        take part in the reduction as images' do, in placeholder order); None: videos pass
        through to the model untouched."""
        return None

    def video_encoder(self) -> tuple[Any, str]:
        """(object, method name) of the function that runs the vision tower for videos."""
        return self.target_module(), "get_video_features"

    def encode_videos(self, kw: dict[str, Any]) -> Any:
        """Calls the (wrapped) video encoder on the forward's video inputs; returns its output."""
        raise NotImplementedError

    def describe_videos(self, output: Any, call: dict[str, Any], signals: dict[str, Any],
                        scratch: dict[str, Any]) -> list[ImageTokens]:
        """Per video, its tokens as an `ImageTokens` (`video=True`, regions and budget after the
        plan's video budget policy)."""
        raise NotImplementedError

    # -- positions ---------------------------------------------------------------------------

    def base_positions(self, kw: dict[str, Any], length: int, scratch: dict[str, Any]) -> torch.Tensor:
        """Position ids [..., B, L] the unpruned model would use for the whole sequence."""
        given = kw.get("position_ids")
        if given is not None:
            return given
        return torch.arange(length, device=kw_device(kw)).expand(kw_batch(kw), length)

    def decode_positions(self, kw: dict[str, Any], start: int, full_mask: torch.Tensor | None) -> torch.Tensor:
        """Position ids the unpruned model would give the new tokens of a decode step called
        without position ids; `start` is their index in the unpruned sequence."""
        n_new = kw_length(kw)
        return (torch.arange(n_new, device=kw_device(kw)) + start).expand(kw_batch(kw), n_new)

    def reduced_positions(self, positions: torch.Tensor, comp: Any, is_image: torch.Tensor,
                          mask: torch.Tensor | None, images: list[ImageTokens] | None,
                          scratch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The compacted sequence's position ids [..., B, W], given those the engine made
        (`positions`: the base positions gathered, renumbered or not); a family that numbers a
        reduced image otherwise (Qwen-VL: an image of the coarser grid) replaces them, and says
        by how much more than the dropped tokens [B, 1] the positions of the tokens after the
        prompt shrink (None: by nothing more). is_image, mask: [B, T] of the uncompacted
        sequence; images: the prefill's (None in a replay)."""
        return positions, None

    def generate_kwargs(self, kwargs: dict[str, Any], state_of: Callable[[Any], Any]) -> dict[str, Any]:
        """The keyword arguments a generate() call passes on (`state_of(cache)`: what the
        pruned prefill that filled a cache decided, None for an unpruned cache)."""
        return kwargs

    def reduced_inputs(self, kw: dict[str, Any], visual: torch.Tensor, streams: list[torch.Tensor],
                       scratch: dict[str, Any]) -> dict[str, Any]:
        """The pruned forward's keyword arguments `kw` with the images' other token streams
        (`ImageTokens.streams`, as the reduction left them: each [K, D], the kept visual tokens
        of all images in placeholder order) passed on to the language model; visual: [B, L']
        bool, the columns of the compacted sequence those tokens sit at. Called only when the
        images brought streams."""
        raise NotImplementedError(f"{type(self).__name__} describes token streams it does not pass on")

    def install(self, patch: Any) -> None:
        """Installs the hooks and wrappers this family needs besides the engine's, through the
        engine (`patch._hooks.append(handle)`, `patch._wrap(owner, name, wrapper)`: removed with
        it; partials of bound methods, not closures, so a deep copy of the model gets its own).
        `patch.token_columns()` tells which columns of the forward's sequence the decoder's
        hidden states hold at the moment (in-LLM pruning drops some inside the decoder)."""

    # -- the decoder (in-LLM methods) -----------------------------------------------------------

    def decoder(self) -> DecoderParts:
        """The language model's decoder layers and their attention parts."""
        return llama_style_decoder(self.model.model.language_model)
