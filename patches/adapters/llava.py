"""LLaVA-1.5 (`LlavaForConditionalGeneration`, model_type "llava"): the family adapter.

Seam: the vision-stage engine hooks the inner `LlavaModel`'s forward. It runs
`get_image_features` (the same call LlavaModel.forward makes), reduces each image's tokens with
the method, and hands the model `inputs_embeds` of the shortened sequence with
`pixel_values=None`, so LlavaModel.forward goes straight to the language model. Nothing in
transformers is modified. In-LLM methods use the Llama-style decoder (FamilyAdapter.decoder).

[CLS] attention: forward hooks on the chosen vision layers' q_proj / k_proj keep the [CLS]
query row and the keys; the row softmax(q_cls . K^T * scale) is computed from them
(`vlm_prune.kernels.cls_attention_scores`), so the tower keeps SDPA. The same hooks give the
keys (VisionZip); a pre-hook on the projector gives the pre-projection features (Fourier-VLM).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from vlm_prune.kernels import cls_attention_scores
from vlm_prune.timing import clock
from vlm_prune.vision_layers import resolve_score_layers

from ..image_tokens import ImageTokens, Region
from .base import FamilyAdapter, this_thread_only


class LlavaAdapter(FamilyAdapter):
    model_types = ("llava",)
    default_positions = "renumber"  # what the LLaVA pruning papers do

    def check(self) -> None:
        inner = self.model.model
        self.vision_layers = self._encoder_layers(inner.vision_tower)
        vision = self.model.config.vision_config
        self._side = vision.image_size // vision.patch_size  # patches per side of the tower's grid
        self.has_cls = hasattr(getattr(inner.vision_tower, "embeddings", None), "class_embedding") or hasattr(
            getattr(getattr(inner.vision_tower, "vision_model", None), "embeddings", None), "class_embedding"
        )
        self.score_layers: tuple[int, ...] = ()
        self.one_head = False  # the [CLS] row as one head over the full width (Recoverable Compression)
        method, config = self.plan.method, self.plan.config
        if "cls_attention" in method.needs:
            if not self.has_cls:
                raise ValueError(
                    f"method {config.method!r} needs a [CLS] token, but the vision tower "
                    f"{type(inner.vision_tower).__name__} has none; use a method without "
                    "[CLS] signals (e.g. 'pool', 'random')"
                )
            layers, self.one_head = method.cls_score(config.options)
            self.score_layers = self._resolve_layers(layers)
        self._score_attention = [self.vision_layers[i].self_attn for i in self.score_layers]

    # -- layers ----------------------------------------------------------------------------

    @staticmethod
    def _encoder_layers(vision_tower) -> torch.nn.ModuleList:
        tower = getattr(vision_tower, "vision_model", vision_tower)  # transformers < 5 nests it
        return tower.encoder.layers

    def _feature_producing_layer(self) -> int:
        """Index into encoder.layers of the layer whose output is hidden_states[vision_feature_layer]."""
        feature_layer = self.model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            feature_layer = max(f % (len(self.vision_layers) + 1) for f in feature_layer)
        produced_by = feature_layer % (len(self.vision_layers) + 1) - 1
        if produced_by < 0:
            raise ValueError(
                f"vision_feature_layer={feature_layer} selects the embeddings; no attention layer "
                "produces them, so pass layers=[...] to cls_attention"
            )
        return produced_by

    def _feature_layers(self) -> tuple[int, ...]:
        """Indices into encoder.layers of the layers whose outputs are the LLM's features (in
        the order LLaVA concatenates them); () when one of them is the embeddings."""
        feature_layer = self.model.config.vision_feature_layer
        wanted = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        produced_by = [f % (len(self.vision_layers) + 1) - 1 for f in wanted]
        return () if min(produced_by) < 0 else tuple(produced_by)

    def _resolve_layers(self, layers: tuple[int, ...] | None) -> tuple[int, ...]:
        if layers is None:
            return (self._feature_producing_layer(),)
        return resolve_score_layers(layers, len(self.vision_layers))  # transformers runs every layer

    # -- family hooks ------------------------------------------------------------------------

    # arguments of LlavaModel.forward that are not passed on to get_image_features
    _FORWARD_ONLY = frozenset({
        "pixel_values", "vision_feature_layer", "vision_feature_select_strategy", "image_sizes",
        "input_ids", "attention_mask", "position_ids", "cache", "past_key_values",
        "inputs_embeds", "mm_encoder_outputs",
    })

    def encode(self, kw: dict[str, Any]) -> Any:
        extra = {k: v for k, v in kw.items() if k not in self._FORWARD_ONLY}
        return self.model.model.get_image_features(
            pixel_values=kw["pixel_values"],
            vision_feature_layer=kw.get("vision_feature_layer"),
            vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
            image_sizes=kw.get("image_sizes"),
            return_dict=True,
            **extra,
        )

    def _strategy(self, call: dict[str, Any]) -> str:
        return call.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy

    def describe_images(self, output, call, signals, scratch) -> list[ImageTokens]:
        features = list(output.pooler_output)
        full = self._strategy(call) == "full"
        # With "full", a CLIP tower's [CLS] feature is the first token: kept, not in the grid.
        n_prefix = 1 if (full and self.has_cls) else 0
        side = self._side
        # Tower-level signals cover every token the tower saw ([CLS] first); keep what the LLM gets.
        per_token = {name: (value if full else value[:, 1:]) for name, value in signals.items()
                     if name in ("cls_attention", "keys")}
        if "pre_projection" in signals:
            per_token["pre_projection"] = signals["pre_projection"]  # the projector's input
        # the [CLS] feature, which the "default" strategy drops (with "full" it is a token already)
        cls_feature = signals.get("cls_feature") if not full else None
        images = []
        for i, feats in enumerate(features):
            if feats.shape[0] - n_prefix != side * side:
                raise ValueError(
                    f"image {i} gives {feats.shape[0]} visual tokens; expected a {side}x{side} patch "
                    f"grid{' plus [CLS]' if n_prefix else ''}"
                )
            region = Region.span(n_prefix, feats.shape[0], (side, side), feats.device, crop=0)
            context = {"cls_feature": cls_feature[i:i + 1]} if cls_feature is not None else {}
            images.append(ImageTokens(feats, [region], {name: value[i] for name, value in per_token.items()}, context))
        return images

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def capture_signals(self, scratch):
        return self._capture_tower_signals(scratch)

    @contextlib.contextmanager
    def _capture_tower_signals(self, scratch: dict[str, Any]):
        """Yields a dict that holds, once the tower ran (I = images or crops, T = tokens incl. [CLS]):
        "cls_attention": [I, T] float32, the [CLS] attention rows of `score_layers` summed;
        "keys": [I, T, Dh] keys of the last score layer averaged over heads (methods that need keys);
        "pre_projection": [I, N, Dv] the projector's input (methods that use it);
        "cls_feature": [I, Dv] the [CLS] token's feature of the feature layer(s), before the
        projector (methods that use it; concatenated over the layers as LLaVA concatenates)."""
        result: dict[str, torch.Tensor] = {}
        captured: dict[Any, dict[str, torch.Tensor]] = {}
        handles = []
        for layer_idx, attn in zip(self.score_layers, self._score_attention):
            slot = captured.setdefault(layer_idx, {})
            # q: only the [CLS] row is kept; k: all keys. Both are the layer's own projections.
            handles.append(attn.q_proj.register_forward_hook(this_thread_only(_store(slot, "q", first_row=True))))
            handles.append(attn.k_proj.register_forward_hook(this_thread_only(_store(slot, "k"))))
        feature_layers = self._feature_layers() if "cls_feature" in self.plan.method.needs and self.has_cls else ()
        for layer_idx in feature_layers:
            slot = captured.setdefault(("feature", layer_idx), {})
            handles.append(self.vision_layers[layer_idx].register_forward_hook(this_thread_only(_store_cls(slot))))
        if self.plan.method.uses_pre_projection:
            slot = captured.setdefault("projector", {})
            handles.append(self.model.model.multi_modal_projector.register_forward_pre_hook(
                this_thread_only(lambda module, args: slot.update(input=args[0]))))
        try:
            yield result
        finally:
            for h in handles:
                h.remove()
        if "projector" in captured:
            result["pre_projection"] = captured["projector"]["input"]
        if feature_layers:
            result["cls_feature"] = torch.cat([captured[("feature", i)]["cls"] for i in feature_layers], dim=-1)
        if not self.score_layers:
            return
        start = clock(self.model)
        total = None
        for layer_idx, attn in zip(self.score_layers, self._score_attention):
            q, k = captured[layer_idx]["q"], captured[layer_idx]["k"]
            heads, head_dim, scale = attn.num_heads, attn.head_dim, attn.scale
            if self.one_head:  # the raw projections, one head over the width, 1 / sqrt(width)
                heads, head_dim, scale = 1, q.shape[-1], q.shape[-1] ** -0.5
            query = q.view(q.shape[0], heads, head_dim)
            keys = k.view(k.shape[0], k.shape[1], heads, head_dim).transpose(1, 2)
            row = cls_attention_scores(query, keys, scale, self.plan.config.backend)
            total = row if total is None else total + row
        result["cls_attention"] = total
        if "keys" in self.plan.method.needs:
            k = captured[self.score_layers[-1]]["k"]
            heads = 1 if self.one_head else self._score_attention[-1].num_heads
            result["keys"] = k.view(*k.shape[:-1], heads, -1).mean(-2)  # VisionZip: heads averaged
        scratch["signal_s"] = scratch.get("signal_s", 0.0) + clock(self.model) - start


def _store_cls(slot: dict[str, torch.Tensor]):
    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        slot["cls"] = hidden[:, 0]

    return hook


def _store(slot: dict[str, torch.Tensor], key: str, first_row: bool = False):
    def hook(module, inputs, output):
        slot[key] = output[:, 0] if first_row else output

    return hook
