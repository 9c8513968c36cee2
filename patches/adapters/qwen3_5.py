"""Qwen3.5 and Qwen3.5-MoE (model_type "qwen3_5", "qwen3_5_moe"): the family adapter.

The vision side is Qwen2-VL's (`QwenVLAdapter`): the seam is the inner `Qwen3_5Model`'s forward
and its `get_image_features` (Qwen2-VL's inner model, with Qwen3-VL's vision tower minus its
DeepStack mergers: the tower's only output is the merged tokens, so nothing else follows a
reduction); one region per image frame of (h/2) x (w/2) merged tokens; M-RoPE positions of
images numbered as Qwen2-VL's (`mrope.image_rope_index`, checked against the model's own
`get_rope_index` on the first prompt; Qwen3.5's differs only for videos, which it splits into
frames, and prompts with videos use the model's); decode steps from the unpruned model's
rope_deltas; the [CLS]-free score from the last vision block's fused `qkv` and
`apply_rotary_pos_emb_vision`. Videos pass through unpruned, as on Qwen2-VL.

The decoder is hybrid: each layer's token mixer is either a Gated DeltaNet ("linear_attention":
a causal depthwise convolution over the last few tokens and a recurrent state, no KV cache) or
softmax attention ("full_attention": an output gate, per-head q/k RMS norms, partial M-RoPE).

Vision-stage methods shorten the prompt before the language model runs, so every layer --
recurrent ones included -- simply sees a shorter prompt: exact, nothing to add.

In-LLM methods (transition, fastv) drop tokens after a layer. That is exact for a recurrent layer
too: after a stage, the layer's convolution and state run over the kept tokens only, in the
cached prefill and in every replay of generate(use_cache=False) alike (the replays keep the
prompt's selection), and decode steps continue that state. The engine gives a recurrent layer
the 2-D padding mask of the columns it sees (`RecurrentLayerParts`): the padding slots a stage
adds sit before a row's real tokens, as the caller's left padding does, and their inputs are
zeroed so the state never sees them. Two things are refused at patch() time, because they
cannot be exact:

- a stage that scores with the attention rows of a linear-attention layer (fastv's layer K-1,
  transition's stage layers): a Gated DeltaNet has no attention map to read rows from;
- a stage that starts at or before the first full-attention layer: transformers reads the
  cache's length, generate()'s positions and the decoder's masks from the first layer that
  keeps keys, which the in-LLM engine needs to hold every token of the prompt.

The released models (one full-attention layer after every three linear ones: 3, 7, 11, ...) take
fastv with `layer` = 4, 8, ... and transition with `iga_layer="own"` and a `schedule` whose
stages start after a full-attention layer (or `alpha=1.0`, which reads no attention rows).
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import torch

from .base import AttentionParts, DecoderParts, LayerParts
from .qwen2_vl import QwenVLAdapter


@dataclasses.dataclass(frozen=True)
class RecurrentLayerParts(LayerParts):
    """A decoder layer whose token mixer keeps a recurrent state instead of a KV cache (a Gated
    DeltaNet); the in-LLM engine gives it a 2-D padding mask [B, L'] instead of a 4-D one.
    `attention` holds the mixer module only (no attention rows can be read from it)."""

    recurrent: bool = True


def gated_query_norm(q_norm: torch.nn.Module, q: torch.Tensor) -> torch.Tensor:
    """Qwen3.5's q_proj output split into heads [..., 2H, Dh] -> the queries [..., H, Dh] with
    the layer's per-head RMS norm: the projection holds each head's query and then its output
    gate (head h: slots 2h and 2h + 1)."""
    return q_norm(q[..., 0::2, :])


class Qwen3_5Adapter(QwenVLAdapter):
    model_types = ("qwen3_5", "qwen3_5_moe")

    def decoder(self) -> DecoderParts:
        """The hybrid decoder's layers: full-attention layers as Llama-style parts with Qwen3.5's
        gated query and q/k norms, linear-attention layers as `RecurrentLayerParts`. Raises
        ValueError when the in-LLM method's stages cannot be exact here (module docstring)."""
        language_model = self.model.model.language_model
        layer_types = list(language_model.config.layer_types)
        self._refuse_stages(layer_types)
        layers: list[LayerParts] = []
        for i, layer in enumerate(language_model.layers):
            if layer_types[i] == "full_attention":
                attn = layer.self_attn
                rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # partial rotary aware
                # partials, not closures: a deep copy of the model gets its own norms
                parts = AttentionParts(attn, attn.q_proj, attn.k_proj, attn.head_dim, attn.scaling, attn.layer_idx,
                                       rotary, q_norm=functools.partial(gated_query_norm, attn.q_norm),
                                       k_norm=attn.k_norm)
                layers.append(LayerParts(layer, layer.input_layernorm, parts, layer.mlp))
            else:
                mixer = layer.linear_attn
                parts = AttentionParts(mixer, None, None, 0, 0.0, i, None)
                layers.append(RecurrentLayerParts(layer, layer.input_layernorm, parts, layer.mlp))
        return DecoderParts(layers, language_model.rotary_emb, lambda: language_model.config._attn_implementation)

    def _refuse_stages(self, layer_types: list[str]) -> None:
        method, config = self.plan.method, self.plan.config
        model_type = self.model.config.model_type
        full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
        stages = method.stages(config.options, config.keep, len(layer_types))
        first = stages[0].after_layer
        if not full or full[0] >= first:
            raise ValueError(
                f"vlm_prune: method {config.method!r} on {model_type} drops tokens after decoder layer {first}, but "
                f"the first full-attention layer is {full[0] if full else None} (layer_types: full attention at "
                f"{full}): transformers reads the cache's length, generate()'s positions and the masks from that "
                "layer, which must hold every prompt token; start the stages after it "
                f"(fastv: layer > {full[0] if full else 0}; transition: schedule=[...])")
        if method.query_rows(config.options) is None:
            return
        own = method.attention_layer(config.options) == "own"
        for stage in stages:
            layer = stage.after_layer - 1 if own else stage.after_layer
            if layer_types[layer] != "full_attention":
                hint = (f"fastv: layer = a full-attention layer + 1, one of {[i + 1 for i in full]}"
                        if config.method == "fastv" else
                        f"transition: iga_layer='own' with a schedule whose stages start after full-attention "
                        f"layers ({[i + 1 for i in full]}), or alpha=1.0 (no attention rows)")
                raise ValueError(
                    f"vlm_prune: method {config.method!r} on {model_type} scores the stage after layer "
                    f"{stage.after_layer} with the attention rows of decoder layer {layer}, a linear-attention "
                    f"(Gated DeltaNet) layer, which has no attention map; full-attention layers: {full}. {hint}")
