"""Qwen3-VL and Qwen3-VL-MoE (model_type "qwen3_vl", "qwen3_vl_moe"): the family adapter.

Everything Qwen2-VL's adapter does holds here (`QwenVLAdapter`): the seam (the inner
`Qwen3VLModel`'s forward and its `get_image_features`), one region per image frame of
(h/2) x (w/2) merged tokens, original M-RoPE positions (text after an image continues from its
extent; `positions="renumber"` only for methods whose output is a coarser grid, numbered as an
image of that grid -- `dct`'s release), decode steps numbered from the unpruned model's
rope_deltas, and the [CLS]-free score: the attention each patch receives in the last vision
block (its fused `qkv`, `apply_rotary_pos_emb_vision`), averaged per 2x2 merge unit. Qwen3-VL's
M-RoPE interleaves the (t, h, w) frequencies inside the rotary embedding; the position ids
themselves are numbered as Qwen2-VL's for images (checked against the model's `get_rope_index`
on the first prompt).

DeepStack: the vision tower also merges the hidden states of a few intermediate blocks
(`deepstack_visual_indexes`) into features of the LLM's width, one level per block, which the
language model adds to the hidden states of the image tokens after its first decoder layers
(level i after layer i). One consistent token set reaches every decoder layer:

- vision-stage methods: each level is an `ImageTokens.streams` entry and gets the reduction the
  main tokens got, with the main tokens' decisions (`image_tokens.follow_reduction`): a kept
  token's levels are its own; a merged token's levels are the same merge of the levels (the
  mean / weighted mean of the same groups, the same pooling or DCT low-pass). The reduced levels
  reach the language model through a keyword argument of the inner forward that a pre-hook of
  the language model turns into its `visual_pos_masks` / `deepstack_visual_embeds` (the
  columns of the kept visual tokens in the compacted sequence); in replays of
  generate(use_cache=False) too.
- in-LLM methods (transition, fastv): the model computes the levels for every image token; a
  stage that drops tokens before the last DeepStack layer gets them sliced to the tokens that
  layer's hidden states hold (the language model's `_deepstack_process`, wrapped).
- the in-LLM engine recomputes attention rows from a layer's q/k projections: Qwen3's per-head
  RMS norms (`q_norm`, `k_norm`) are applied there as the layer applies them.

Videos are pruned as Qwen2-VL's are (`QwenVLAdapter`); each temporal patch sits in its own
vision run after its timestamp text, and a video's DeepStack levels follow its tokens' reduction
as an image's do (the model merges image and video levels in placeholder order, as the engine
orders the items).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from ..image_tokens import ImageTokens
from .base import DecoderParts, llama_style_decoder
from .qwen2_vl import QwenVLAdapter

# the inner forward's keyword argument that carries the reduced DeepStack levels to the
# language model (Qwen3VLModel.forward passes unknown keyword arguments on to it)
DEEPSTACK_KWARG = "_vlm_prune_deepstack"


class Qwen3VLAdapter(QwenVLAdapter):
    model_types = ("qwen3_vl", "qwen3_vl_moe")

    def describe_images(self, output, call, signals, scratch) -> list[ImageTokens]:
        return _with_deepstack(super().describe_images(output, call, signals, scratch), output)

    def describe_videos(self, output, call, signals, scratch) -> list[ImageTokens]:
        return _with_deepstack(super().describe_videos(output, call, signals, scratch), output)

    def reduced_inputs(self, kw: dict[str, Any], visual: torch.Tensor, streams: list[torch.Tensor],
                       scratch: dict[str, Any]) -> dict[str, Any]:
        return {**kw, DEEPSTACK_KWARG: (visual, list(streams))}

    def install(self, patch: Any) -> None:
        language_model = self.model.model.language_model
        # partials of bound methods, not closures: a deep copy of the model gets its own
        patch._hooks.append(language_model.register_forward_pre_hook(self._deliver_deepstack, with_kwargs=True))
        patch._wrap(language_model, "_deepstack_process",
                    functools.partial(self._deepstack_at_columns, language_model._deepstack_process, patch))

    @staticmethod
    def _deliver_deepstack(module, args, kwargs):
        """Pre-hook of the language model: the reduced levels of a pruned prefill (see
        `reduced_inputs`) as its own DeepStack arguments."""
        if DEEPSTACK_KWARG not in kwargs:
            return None
        kwargs = dict(kwargs)
        visual, levels = kwargs.pop(DEEPSTACK_KWARG)
        kwargs.update(visual_pos_masks=visual, deepstack_visual_embeds=levels)
        return args, kwargs

    @staticmethod
    def _deepstack_at_columns(original, patch, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                              visual_embeds: torch.Tensor) -> torch.Tensor:
        """The language model's `_deepstack_process` on the columns its hidden states hold now:
        an in-LLM stage before the last DeepStack layer dropped some (the mask and the level's
        features are the whole sequence's)."""
        columns = patch.token_columns()
        if columns is not None:
            visual_pos_masks, visual_embeds = deepstack_at_columns(visual_pos_masks, visual_embeds, columns)
        return original(hidden_states, visual_pos_masks, visual_embeds)

    def decoder(self) -> DecoderParts:
        """Llama-style layers whose attention norms q and k per head after the projections."""
        parts = llama_style_decoder(self.model.model.language_model)
        layers = [dataclasses.replace(layer, attention=dataclasses.replace(
            layer.attention, q_norm=layer.attention.module.q_norm, k_norm=layer.attention.module.k_norm))
            for layer in parts.layers]
        return dataclasses.replace(parts, layers=layers)


def _with_deepstack(items: list[ImageTokens], output: Any) -> list[ImageTokens]:
    """`items` (an encoder call's images or videos) with their DeepStack levels as streams: level
    i of item j is the encoder output's deepstack_features[i][j], [N_j, D]."""
    levels = getattr(output, "deepstack_features", None) or []
    for level in levels:
        if len(level) != len(items):
            raise ValueError(f"{len(level)} DeepStack features for {len(items)} images or videos")
    for i, item in enumerate(items):
        item.streams = [level[i].to(item.features.device) for level in levels]
    return items


def deepstack_at_columns(mask: torch.Tensor, embeds: torch.Tensor,
                         columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A DeepStack level on a subset of the sequence's columns.

    mask: [B, L] bool, the visual columns of the whole sequence; embeds: [V, D] their features
    in row-major order; columns: [B, L'] the columns kept, -1 for padding slots. Returns the
    mask [B, L'] of the kept visual columns and their features [V', D] in row-major order."""
    mask = mask.to(columns.device)
    safe = columns.clamp(min=0)
    row = (mask.flatten().long().cumsum(0) - 1).view_as(mask)  # each visual column's row of `embeds`
    kept = mask.gather(1, safe) & (columns >= 0)
    rows = row.gather(1, safe)[kept]
    return kept, embeds.index_select(0, rows.to(embeds.device))
