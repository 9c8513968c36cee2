"""Hand-built references for the contracts, written without vlm_prune's own code paths:
eager [CLS] attention from a copy of the vision tower, and the unpatched language model run on
a sequence assembled token by token with boolean indexing."""

from __future__ import annotations

import copy

import torch


def eager_cls_scores(model, pixel_values: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """[I, N] [CLS]->patch attention, heads averaged, summed over encoder `layers` (eager attention)."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = tower(pixel_values, output_attentions=True).attentions
    return sum(attentions[layer][:, :, 0, 1:].float().mean(1) for layer in layers)


def top_k_sorted(scores: torch.Tensor, k: int) -> list[list[int]]:
    return [sorted(row.topk(k).indices.tolist()) for row in scores]


def image_features(model, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output)


def reference_logits(model, input_ids: torch.Tensor, kept_features: list[torch.Tensor],
                     kept_index: list[list[int]], positions: str,
                     base_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [T', V] of the unpatched LM on one unpadded prompt (input_ids: [L]) whose i-th image
    keeps `kept_index[i]` (indices into its placeholder run) with features `kept_features[i]`.

    base_positions: the unpruned model's position ids ([L] or [3, L] for M-RoPE; default arange).
    positions="original" gathers them at the kept tokens; "renumber" also subtracts the number of
    tokens dropped before each kept one.
    """
    image_token = model.config.image_token_id
    is_image = input_ids == image_token
    keep = torch.ones_like(is_image)
    run_starts = [j for j in range(len(input_ids)) if is_image[j] and (j == 0 or not is_image[j - 1])]
    assert len(run_starts) == len(kept_index)
    for start, kept in zip(run_starts, kept_index):
        run = start
        while run < len(input_ids) and is_image[run]:
            run += 1
        keep[start:run] = False
        keep[torch.tensor(kept, dtype=torch.long) + start] = True
    if base_positions is None:
        base_positions = torch.arange(len(input_ids))
    position_ids = base_positions[..., keep]
    if positions == "renumber":
        dropped_before = torch.cumsum((~keep).long(), 0)[keep]
        position_ids = position_ids - dropped_before
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(input_ids[keep]).clone()
        embeds[is_image[keep]] = torch.cat(kept_features).to(embeds.dtype)
        hidden = model.model.language_model(
            inputs_embeds=embeds[None],
            position_ids=position_ids.unsqueeze(-2),
            attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
            use_cache=False,
        ).last_hidden_state
        return model.lm_head(hidden)[0]
