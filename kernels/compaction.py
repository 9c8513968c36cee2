"""The language model's shortened prefill inputs, built from the prompt and the kept visual tokens.

One op for what a vision-stage prefill does after the method chose its tokens: the prompt's keep
mask, the compaction (which prompt column goes to which slot, re-padded when rows keep different
counts), the embeddings of the kept text tokens with the kept visual features in the image
slots, the position ids (renumbered or not) and the attention mask.

`compact_prompt` dispatches to `triton_compaction.compact_prompt` (two launches: an index pass
per row and a fully parallel copy of the rows) or to `compact_prompt_ref`, the reference and CPU
path, which is a chain of some twenty small PyTorch ops -- each a launch and a few microseconds
of host time on a GPU, in every prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vlm_prune.sequence import Compaction

from .dispatch import fused_or_reference


@dataclass
class CompactedPrompt:
    """embeds:     [B, W, D] the language model's input embeddings (W = the longest kept row).
    positions:  [..., B, W] int64 position ids (the planes of the positions given; [B, W] if none).
    mask:       [B, W] attention mask, or None when none was asked for.
    compaction: which prompt column each slot holds (decode steps and replays reuse it).
    keep:       [B, L] bool, the prompt columns kept.
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None
    compaction: Compaction
    keep: torch.Tensor


def compacted_inputs(comp: Compaction, visual_kept: torch.Tensor, features: torch.Tensor,
                     embed: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor | None,
                     inputs_embeds: torch.Tensor | None, pad_id: int, positions: torch.Tensor,
                     renumber: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and positions of a compacted sequence (prompt plus any tokens generated since).

    visual_kept: [B, T] bool, the columns whose embedding is a kept visual feature;
    features: [K, D] those features in row-major column order; input_ids [B, T] (embedded with
    `embed` after compaction, re-padded slots get `pad_id`) or inputs_embeds [B, T, D];
    positions: [..., B, T]. Returns ([B, T', D], [..., B, T']).
    """
    image_slots = comp.gather(visual_kept, False)
    if input_ids is not None:
        embeds = embed(comp.gather(input_ids, pad_id))
    else:
        embeds = comp.gather(inputs_embeds, 0, seq_dim=1)
    # the embedding may sit on another device than the prompt or the tower (accelerate's
    # device_map): merge where the embeddings are, as the model's own merge does
    embeds = embeds.masked_scatter(image_slots.unsqueeze(-1).to(embeds.device), features.to(embeds.device, embeds.dtype))
    positions = comp.gather(positions, 0)
    return embeds, comp.renumber(positions) if renumber else positions


def compact_prompt_ref(is_image: torch.Tensor, kept_visual: torch.Tensor, features: torch.Tensor,
                       row_lengths: list[int], left_padded: bool, embedding: Callable[[torch.Tensor], torch.Tensor],
                       input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                       pad_id: int = 0, positions: torch.Tensor | None = None, renumber: bool = True,
                       mask: torch.Tensor | None = None, want_mask: bool = False,
                       features_per_placeholder: bool = False) -> CompactedPrompt:
    """is_image: [B, L] bool, the image placeholders; kept_visual: [S] bool, per placeholder in
    row-major order whether its token stays; features: [K, D] the kept tokens in that order
    (with `features_per_placeholder`: [S, D], a row per placeholder, the kept ones taken);
    row_lengths: each row's length after compaction (host ints); left_padded: re-pad short rows
    on the left; input_ids [B, L] (embedded with `embedding`) or inputs_embeds [B, L, D];
    positions: [..., B, L] or None for 0..L-1; renumber: subtract the tokens dropped before each
    column; mask: [B, L] or None (all ones), compacted only when `want_mask`.
    """
    batch, length = is_image.shape
    if features_per_placeholder:
        features = features[kept_visual.to(features.device)]
    keep = torch.ones_like(is_image)
    keep[is_image] = kept_visual.to(is_image.device)
    comp = Compaction.from_keep_mask(keep, left_padded=left_padded, kept_per_row=row_lengths)
    if positions is None:
        positions = torch.arange(length, device=is_image.device).expand(batch, length)
    embeds, positions = compacted_inputs(comp, is_image & keep, features, embedding, input_ids, inputs_embeds,
                                         pad_id, positions, renumber)
    out_mask = None
    if want_mask:
        out_mask = comp.gather(mask if mask is not None else torch.ones_like(is_image, dtype=torch.long), 0)
    return CompactedPrompt(embeds, positions, out_mask, comp, keep)


def embedding_table(embedding: Callable) -> torch.Tensor | None:
    """The weight of a plain lookup table (what the fused kernel can read), else None.

    None too for a table that accelerate manages (`device_map=` offload): its weight is loaded
    onto the execution device only inside the module's own call (between calls it may be a
    meta tensor), so such an embedding is called, not read."""
    if (type(embedding) is torch.nn.Embedding and embedding.max_norm is None and not hasattr(embedding, "_hf_hook")
            and embedding.weight.device.type != "meta"):
        return embedding.weight
    return None


def compact_prompt(is_image: torch.Tensor, kept_visual: torch.Tensor, features: torch.Tensor,
                   row_lengths: list[int], left_padded: bool, embedding: Callable[[torch.Tensor], torch.Tensor],
                   input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                   pad_id: int = 0, positions: torch.Tensor | None = None, renumber: bool = True,
                   mask: torch.Tensor | None = None, want_mask: bool = False,
                   features_per_placeholder: bool = False, backend: str | None = None) -> CompactedPrompt:
    """See `compact_prompt_ref`. The fused kernels run when the backend routes to Triton and the
    text is embedded by a plain `nn.Embedding` (or comes as inputs_embeds)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("compact_prompt needs exactly one of input_ids and inputs_embeds")
    args = (is_image, kept_visual, features, row_lengths, left_padded)
    kwargs = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, pad_id=pad_id, positions=positions,
                  renumber=renumber, mask=mask, want_mask=want_mask, features_per_placeholder=features_per_placeholder)
    table = embedding_table(embedding) if input_ids is not None else None

    def fused():
        from . import triton_compaction

        index, dropped_before, total_dropped, keep, embeds, out_positions, out_mask = triton_compaction.compact_prompt(
            *args, table=table, **kwargs)
        same = len(set(row_lengths)) <= 1  # no re-padded slots: the index is its own safe index
        comp = Compaction(index, dropped_before, total_dropped, is_image.shape[1], tuple(row_lengths),
                          _safe_index=index if same else None)
        return CompactedPrompt(embeds, out_positions, out_mask, comp, keep)

    def reference():
        return compact_prompt_ref(*args, embedding, **kwargs)

    if table is None and inputs_embeds is None:  # an embedding the kernel cannot read
        return reference()
    return fused_or_reference("compact_prompt", is_image, fused, reference, backend)
