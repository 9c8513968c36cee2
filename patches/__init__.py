"""Model-family patches: one module per family, selected by `config.model_type`
(see vlm_prune.registry.FAMILIES)."""
