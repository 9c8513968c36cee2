"""Signals of in-LLM pruning: transition variation of a sub-module, attention of a few rows."""

from __future__ import annotations

import torch

from .dispatch import fused_or_reference


def transition_variation(
    t_in: torch.Tensor, t_out: torch.Tensor, visual: torch.Tensor, direction: str = "signed",
    backend: str | None = None,
) -> torch.Tensor:
    """TTV of one sub-module: the fused Triton kernel or `transition_variation_ref`."""
    def fused():
        from . import triton_kernels

        return triton_kernels.transition_variation(t_in, t_out, visual, direction)

    return fused_or_reference("transition_variation", t_in, fused,
                              lambda: transition_variation_ref(t_in, t_out, visual, direction), backend)


def transition_variation_ref(
    t_in: torch.Tensor, t_out: torch.Tensor, visual: torch.Tensor, direction: str = "signed"
) -> torch.Tensor:
    """TransPrune's TTV of one sub-module.

    t_in: [B, L, D] the sub-module's normed input; t_out: [B, L, D] its output (before the
    residual add); visual: [B, L] bool, the tokens the softmax runs over (the row's visual
    tokens, or all its real tokens: TransPrune's release takes the whole sequence).
    Returns [B, L] float32: softmax over the row's `visual` tokens of the direction change
    (1 - cos, or 1 - |cos| for direction="abs") times the magnitude ratio ||t_out|| / ||t_in||;
    0 outside them.
    """
    t_in, t_out = t_in.float(), t_out.float()
    norm_in = t_in.norm(dim=-1)
    norm_out = t_out.norm(dim=-1)
    eps = torch.finfo(torch.float32).tiny
    cos = (t_in * t_out).sum(-1) / (norm_in * norm_out).clamp(min=eps)
    change = 1 - (cos.abs() if direction == "abs" else cos)
    weights = torch.softmax(change.masked_fill(~visual, float("-inf")), dim=-1).nan_to_num(0.0)
    return weights * (norm_out / norm_in.clamp(min=eps))


def attention_from_rows(
    query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, row_valid: torch.Tensor, scale: float,
    row_group: torch.Tensor | None = None, column_group: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention a few query rows pay every key, averaged over heads and valid rows.

    query: [B, H, R, Dh], keys: [B, G, L, Dh] (G key/value heads, H % G == 0; RoPE applied),
    allowed: [B, R, L] bool (causal + padding), row_valid: [B, R] bool.
    row_group [B, R] / column_group [B, L] (ints, optional): a column's value is the mean over the
    valid rows of its own group only (VisionDrop: each image's tokens scored by that image's rows).
    Returns [B, L] float32 (0 where no valid row may attend).
    """
    heads, groups = query.shape[1], keys.shape[1]
    keys = keys.repeat_interleave(heads // groups, dim=1)
    logits = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(1)  # [B, R, L]
    weights = row_valid[..., None].float()  # [B, R, 1]: every valid row counts for every column
    if row_group is not None:  # [B, R, L]: only the rows of the column's own group
        weights = weights * (row_group[:, :, None] == column_group[:, None, :])
    return (probs * weights).sum(1) / weights.sum(1).clamp(min=1.0)
