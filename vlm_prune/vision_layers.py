"""Which vision-tower layers a method scores with: one validation for `vlm_prune.patch` and the
vLLM plugin, so a configuration is accepted, resolved and refused the same way on both.

Imports neither transformers nor vLLM: each engine passes the facts of the tower it runs.
"""

from __future__ import annotations


def resolve_score_layers(layers: tuple[int, ...] | None, depth: int, feature_layer: int | None = None,
                         runs: int | None = None, engine: str = "transformers") -> tuple[int, ...]:
    """0-based indices of the layers whose [CLS] attention is summed, sorted.

    layers: the `layers` option as the user gave it (ints, negative from the end; None = the
        layer that produces the LLM's features).
    depth: layers of the vision tower in the checkpoint's config.
    feature_layer: 0-based index of the layer whose output the LLM receives (the default).
    runs: how many of the tower's layers the engine runs (vLLM builds the tower only up to the
        feature layer, which is then layer runs - 1); None = all of them.

    Errors name the value the user typed, never a resolved index."""
    if layers is None:
        if feature_layer is None:
            raise ValueError("no `layers` given and no feature layer to default to")
        return (feature_layer,)
    typed = list(layers)
    bad = [layer for layer in layers if not -depth <= layer < depth]
    if bad:
        raise ValueError(f"layers={typed}: {bad} out of range for a vision tower of {depth} layers "
                         f"(allowed: {-depth} .. {depth - 1})")
    resolved = [layer % depth for layer in layers]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"layers={typed} names the same layer twice")
    runs = depth if runs is None else runs
    beyond = [layer for layer, index in zip(layers, resolved) if index >= runs]
    if beyond:
        raise ValueError(
            f"layers={typed}: {beyond} come after the layer that produces the LLM's features "
            f"(layer {runs - 1}, i.e. {runs - 1 - depth}); {engine} does not run them "
            f"(allowed: {-depth} .. {runs - 1 - depth} or 0 .. {runs - 1})")
    return tuple(sorted(resolved))


def refuse_layers(layers: tuple[int, ...] | None, family: str, scored_by: str) -> None:
    """Families whose score comes from one fixed block (Qwen-VL's last vision block) take no
    `layers` option; silently ignoring it would score with another layer than asked."""
    if layers is not None:
        raise ValueError(f"layers={list(layers)} is not supported on {family}: its score comes from {scored_by}; "
                         "leave `layers` unset")
