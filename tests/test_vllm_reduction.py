"""The head-average reduction behind tensor-parallel pruning on vLLM (`vlm_prune.sharded_scores`),
on a simulated sharded layout, without vLLM: a full qkv projection output is split by heads into
the shards vLLM's QKVParallelLinear gives each rank ([q | k | v] of its own heads), every rank
scores its shard in its own thread and a simulated group sums the partial scores. Every rank must
get the unsharded score (and so keep the same tokens); the old per-rank split with the global
head count (the bug of issue #24) must not.
"""

from __future__ import annotations

import threading

import pytest
import torch

from vlm_prune.kernels.attention_received import attention_received
from vlm_prune.kernels.cls_attention import cls_attention_scores_ref
from vlm_prune.sharded_scores import clip_signals, keys_over_heads, mean_over_heads, received_attention


class SimulatedGroup:
    """A tensor-parallel group of `size` ranks run as threads: all_reduce sums the ranks'
    tensors in rank order (the same result on every rank, as vLLM's collectives give)."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots: list[torch.Tensor | None] = [None] * size
        self.calls = [0] * size

    def run(self, fn):
        """fn(rank, all_reduce) on every rank at once -> the ranks' results."""
        results: list = [None] * self.size
        errors: list = []

        def worker(rank: int):
            def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
                self.calls[rank] += 1
                self.slots[rank] = tensor
                self.barrier.wait()
                total = self.slots[0].clone()
                for other in self.slots[1:]:
                    total += other
                self.barrier.wait()
                return total

            try:
                results[rank] = fn(rank, all_reduce)
            except BaseException as error:  # noqa: BLE001 -- re-raised below
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


def shard_heads(x: torch.Tensor, heads: int, ranks: int, rank: int) -> torch.Tensor:
    """[..., heads * Dh] -> this rank's contiguous block of heads [..., heads / ranks * Dh]."""
    width = x.shape[-1] // ranks
    return x[..., rank * width:(rank + 1) * width]


def qkv_shard(q, k, v, heads, ranks, rank):
    """QKVParallelLinear's output on `rank`: [q | k | v] of its heads."""
    return torch.cat([shard_heads(t, heads, ranks, rank) for t in (q, k, v)], dim=-1)


HEADS, HEAD_DIM = 4, 8


@pytest.fixture
def clip_qkv():
    """Two score layers' q, k, v for 3 images of 1 + 64 tokens, 4 heads of 8."""
    torch.manual_seed(0)
    return [tuple(torch.randn(3, 65, HEADS * HEAD_DIM) * 2 for _ in range(3)) for _ in range(2)]


def reference_cls(layers):
    """The unsharded [CLS] row, heads averaged, summed over layers; the last layer's keys, heads averaged."""
    total = 0
    for q, k, _ in layers:
        query = q[:, 0].view(q.shape[0], HEADS, HEAD_DIM)
        keys = k.view(k.shape[0], k.shape[1], HEADS, HEAD_DIM).transpose(1, 2)
        total = total + cls_attention_scores_ref(query, keys, HEAD_DIM ** -0.5)
    k = layers[-1][1]
    return total, k.view(*k.shape[:-1], HEADS, HEAD_DIM).mean(-2)


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_clip_signals_on_every_rank_equal_the_unsharded_ones(clip_qkv, ranks):
    cls_ref, keys_ref = reference_cls(clip_qkv)
    group = SimulatedGroup(ranks)

    def score(rank, all_reduce):
        shards = [qkv_shard(q, k, v, HEADS, ranks, rank) for q, k, v in clip_qkv]
        return clip_signals(shards, HEADS // ranks, HEADS, HEAD_DIM, all_reduce if ranks > 1 else None, keys=True)

    results = group.run(score)
    for cls_row, keys in results:
        torch.testing.assert_close(cls_row, cls_ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(keys, keys_ref, rtol=1e-5, atol=1e-6)
        # the same kept tokens as one device (16 of the 64 patches, [CLS] dropped)
        assert torch.equal(cls_row[:, 1:].topk(16).indices.sort().values, cls_ref[:, 1:].topk(16).indices.sort().values)
    for cls_row, keys in results[1:]:  # bit-identical across ranks: every rank keeps the same tokens
        assert torch.equal(cls_row, results[0][0]) and torch.equal(keys, results[0][1])
    assert group.calls == [2 if ranks > 1 else 0] * ranks  # one collective per signal, none on one device


def test_one_rank_returns_its_input_unchanged(clip_qkv):
    q, k, v = clip_qkv[0]
    qkv = torch.cat([q, k, v], dim=-1)
    calls = []
    cls_row, _ = clip_signals([qkv], HEADS, HEADS, HEAD_DIM, lambda t: calls.append(t) or t)
    assert not calls
    query = q[:, 0].view(3, HEADS, HEAD_DIM)
    keys = k.view(3, 65, HEADS, HEAD_DIM).transpose(1, 2)
    assert torch.equal(cls_row, cls_attention_scores_ref(query, keys, HEAD_DIM ** -0.5))


def test_the_global_head_count_on_a_shard_is_wrong(clip_qkv):
    """What the plugin did before: each rank split its shard into the GLOBAL head count (heads of
    half the width) -- the ranks then disagree with one device and with each other."""
    cls_ref, _ = reference_cls(clip_qkv[:1])
    q, k, v = clip_qkv[0]
    rows = []
    for rank in range(2):
        qs, ks, _ = qkv_shard(q, k, v, HEADS, 2, rank).chunk(3, dim=-1)
        dim = qs.shape[-1] // HEADS
        query = qs[:, 0].reshape(3, HEADS, dim)
        keys = ks.reshape(3, 65, HEADS, dim).transpose(1, 2)
        rows.append(cls_attention_scores_ref(query, keys, dim ** -0.5))
    kept = [row[:, 1:].topk(16).indices.sort().values for row in (cls_ref, *rows)]
    assert not torch.equal(kept[1], kept[0]) and not torch.equal(kept[1], kept[2])


@pytest.mark.parametrize("ranks", [2, 4])
def test_qwen_received_attention_and_keys_on_every_rank(ranks):
    """Qwen's score: the attention each token receives in its segment (two images), from the
    rotated q and k of the rank's heads; keys before the rotary. Both heads-averaged."""
    torch.manual_seed(1)
    total = 48 + 32
    q_rot, k_rot, keys = (torch.randn(total, HEADS, HEAD_DIM) * 2 for _ in range(3))
    segments = torch.tensor([0, 48, 80])
    scale = HEAD_DIM ** -0.5
    received_ref = attention_received(q_rot.transpose(0, 1), k_rot.transpose(0, 1), scale, segments)
    keys_ref = keys.mean(1)
    width = HEADS // ranks

    def score(rank, all_reduce):
        local = slice(rank * width, (rank + 1) * width)
        return (received_attention(q_rot[:, local], k_rot[:, local], scale, segments, HEADS, all_reduce),
                keys_over_heads(keys[:, local], HEADS, all_reduce))

    results = SimulatedGroup(ranks).run(score)
    for received, k in results:
        torch.testing.assert_close(received, received_ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(k, keys_ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(received, results[0][0])
    # the local heads alone rank differently from all heads (why the collective is needed)
    alone = attention_received(q_rot[:, :width].transpose(0, 1), k_rot[:, :width].transpose(0, 1), scale, segments)
    assert not torch.equal(alone.topk(20).indices.sort().values, received_ref.topk(20).indices.sort().values)


def test_mean_over_heads_keeps_the_dtype_and_refuses_bad_splits():
    local = torch.randn(5, 8, dtype=torch.bfloat16)
    out = SimulatedGroup(2).run(lambda rank, all_reduce: mean_over_heads(local, 2, 4, all_reduce))
    assert out[0].dtype == torch.bfloat16
    torch.testing.assert_close(out[0], local)  # two equal halves: the mean of the halves' means
    with pytest.raises(ValueError, match="cannot be split"):
        mean_over_heads(local, 3, 4, lambda t: t)
    with pytest.raises(ValueError, match="no collective"):
        mean_over_heads(local, 2, 4, None)
