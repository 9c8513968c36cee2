"""Head-averaged vision signals when the attention heads are split across devices.

Under tensor parallelism (vLLM's --tensor-parallel-size) each rank holds `local_heads` of a
vision attention layer's `total_heads` heads: its shard of the fused qkv projection is
[q | k | v] of its own heads (vLLM's QKVParallelLinear; Qwen2-VL's ColumnParallelLinear after
its `split_qkv`). Every signal the methods read that is an average over heads -- the [CLS] row
of the attention map, the attention each token receives, the keys -- is then
    all_reduce(sum over the rank's heads) / total_heads,
the same value on every rank as on one device, so every rank keeps the same tokens. Features and
the [CLS] token's feature need nothing: they are full width on every rank (the row-parallel
out/fc2 projections end in an all-reduce).

Framework-neutral: no vLLM import; the collective is passed in (vLLM's
`tensor_model_parallel_all_reduce` in the plugin, a simulated group in tests). One rank
(local_heads == total_heads) returns its input unchanged, without calling the collective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .kernels import attention_received, cls_attention_scores

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sum over the tensor-parallel group, same result on every rank


def mean_over_heads(local_mean: torch.Tensor, local_heads: int, total_heads: int,
                    all_reduce: AllReduce | None) -> torch.Tensor:
    """A value averaged over this rank's `local_heads` heads -> averaged over all `total_heads`
    (the partial sums added in float32 across the group; the result in the input's dtype)."""
    if local_heads == total_heads:
        return local_mean
    if local_heads <= 0 or total_heads % local_heads:
        raise ValueError(f"vlm_prune: {total_heads} attention heads cannot be split into shards of {local_heads}")
    if all_reduce is None:
        raise ValueError(f"vlm_prune: this rank holds {local_heads} of {total_heads} heads but no collective was given")
    partial = (local_mean.float() * local_heads).contiguous()
    return (all_reduce(partial) / total_heads).to(local_mean.dtype)


def split_qkv(qkv: torch.Tensor, local_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """[..., T, 3 * local_heads * head_dim] laid out [q | k | v] -> q, k, v [..., local_heads, T, head_dim]."""
    q, k, v = qkv.split(local_heads * head_dim, dim=-1)
    return tuple(x.unflatten(-1, (local_heads, head_dim)).transpose(-3, -2) for x in (q, k, v))


def clip_signals(qkv_outputs: Sequence[torch.Tensor], local_heads: int, total_heads: int, head_dim: int,
                 all_reduce: AllReduce | None, keys: bool = False,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A CLIP tower's [CLS]-attention signals from this rank's fused qkv outputs of the score
    layers (each [I, T, 3 * local_heads * head_dim], [CLS] first).

    Returns ("cls_attention" [I, T] float32: the [CLS] query row of each layer's attention,
    averaged over all heads, summed over the layers; "keys" [I, T, head_dim] of the last layer,
    averaged over all heads, when `keys`). One collective per signal."""
    total = None
    for qkv in qkv_outputs:
        q, k, _ = split_qkv(qkv, local_heads, head_dim)  # [I, h, T, Dh]
        row = cls_attention_scores(q[:, :, 0], k, head_dim ** -0.5, backend)  # local heads' mean
        total = row if total is None else total + row
    cls_row = mean_over_heads(total, local_heads, total_heads, all_reduce)
    if not keys:
        return cls_row, None
    k = split_qkv(qkv_outputs[-1], local_heads, head_dim)[1]
    return cls_row, mean_over_heads(k.mean(1), local_heads, total_heads, all_reduce)


def received_attention(q_rot: torch.Tensor, k_rot: torch.Tensor, scale: float, cu_seqlens: torch.Tensor,
                       total_heads: int, all_reduce: AllReduce | None) -> torch.Tensor:
    """q_rot, k_rot: [T, local_heads, Dh] (rotary applied) -> [T] float32: the attention each
    token receives from its segment's queries, averaged over all heads and those queries (Qwen's
    [CLS]-free score, `kernels.attention_received`)."""
    local = attention_received(q_rot.transpose(0, 1), k_rot.transpose(0, 1), scale, cu_seqlens)
    return mean_over_heads(local, q_rot.shape[1], total_heads, all_reduce)


def keys_over_heads(keys: torch.Tensor, total_heads: int, all_reduce: AllReduce | None) -> torch.Tensor:
    """keys [T, local_heads, Dh] -> [T, Dh], averaged over all heads."""
    return mean_over_heads(keys.mean(1), keys.shape[1], total_heads, all_reduce)
