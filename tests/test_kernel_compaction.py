"""The fused prefill compaction (`triton_compaction.compact_prompt`) against its reference
(`compaction.compact_prompt_ref`, the PyTorch path the patches take on CPU): every output equal,
over dtypes, odd lengths (63, 577, 2340), batches 1-3, rows keeping different counts (re-padded
on either side), a row without images, a row that drops all its visual tokens, 1-D and M-RoPE
3-D positions, masks, inputs_embeds. Output buffers start as garbage, so an unwritten slot fails.
On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set in conftest)."""

from __future__ import annotations

import pytest
import torch

from vlm_prune.kernels import top_k_in_order, top_k_in_order_ref
from vlm_prune.kernels.compaction import compact_prompt, compact_prompt_ref
from vlm_prune.kernels.dispatch import interpreting

triton_compaction = pytest.importorskip("vlm_prune.kernels.triton_compaction", reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
GPU_ONLY = pytest.mark.skipif(DEVICE != "cuda", reason="GPU only: the interpreter's bf16 arithmetic is wrong")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=GPU_ONLY)]
IMAGE_ID, VOCAB = 7, 50


pytestmark = pytest.mark.usefixtures("garbage_buffers")


def make_prompt(batch: int, length: int, seed: int):
    """input_ids [B, L] with image placeholders: row 0 two images, row 1 none (when B > 1), row 2
    one image; and per placeholder whether it is kept (row 2 keeps none of its own)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    ids[ids == IMAGE_ID] = IMAGE_ID + 1
    ids[0, 3:length // 3] = IMAGE_ID
    ids[0, length // 2:length - 5] = IMAGE_ID
    if batch > 2:
        ids[2, 1:length - 1] = IMAGE_ID
    is_image = ids == IMAGE_ID
    kept = torch.rand(int(is_image.sum()), generator=gen) < 0.3
    if batch > 2:
        kept[-int(is_image[2].sum()):] = False
    return ids.to(DEVICE), is_image.to(DEVICE), kept.to(DEVICE)


def row_lengths(is_image, kept):
    keep = torch.ones_like(is_image)
    keep[is_image] = kept
    return keep.sum(1).tolist()


def assert_same(got, expected):
    for name in ("embeds", "positions", "mask", "keep"):
        a, b = getattr(got, name), getattr(expected, name)
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        assert torch.equal(a, b), name
    for name in ("index", "dropped_before", "total_dropped"):
        assert torch.equal(getattr(got.compaction, name), getattr(expected.compaction, name)), name
    assert got.compaction.kept_per_row == expected.compaction.kept_per_row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, length, dim", [(1, 63, 64), (3, 577, 80), (2, 2340, 128)])
@pytest.mark.parametrize("left_padded", [True, False])
def test_compact_prompt_from_token_ids(dtype, batch, length, dim, left_padded):
    ids, is_image, kept = make_prompt(batch, length, seed=length)
    embedding = torch.nn.Embedding(VOCAB, dim).to(DEVICE, dtype)
    features = torch.randn(int(kept.sum()), dim, device=DEVICE)  # float32 into a `dtype` sequence
    mask = torch.ones(batch, length, dtype=torch.long, device=DEVICE)
    mask[-1, :2] = 0
    lengths = row_lengths(is_image, kept)
    args = (is_image, kept, features, lengths, left_padded, embedding)
    kw = dict(input_ids=ids, pad_id=3, mask=mask, want_mask=True, renumber=True)
    with torch.no_grad():
        got = compact_prompt(*args, backend="triton", **kw)
        assert_same(got, compact_prompt_ref(*args, **kw))
    assert got.embeds.shape == (batch, max(lengths), dim)


@pytest.mark.parametrize("positions_kind", ["none", "given", "mrope"])
@pytest.mark.parametrize("renumber", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "long", "bool"])
def test_compact_prompt_positions_and_masks(positions_kind, renumber, mask_kind):
    batch, length, dim = 3, 63, 16
    ids, is_image, kept = make_prompt(batch, length, seed=1)
    embedding = torch.nn.Embedding(VOCAB, dim).to(DEVICE)
    features = torch.randn(int(kept.sum()), dim, device=DEVICE)
    positions = None
    if positions_kind == "given":
        positions = (torch.arange(length, device=DEVICE) + 5).expand(batch, length)  # a stride-0 batch dim
    elif positions_kind == "mrope":  # [3, B, L] stored as [B, L, 3]: strided planes
        positions = torch.randint(0, 99, (batch, length, 3), device=DEVICE).permute(2, 0, 1)
    mask = None
    if mask_kind != "none":
        mask = (torch.rand(batch, length, device=DEVICE) < 0.9)
        mask = mask if mask_kind == "bool" else mask.long()
    lengths = row_lengths(is_image, kept)
    args = (is_image, kept, features, lengths, True, embedding)
    kw = dict(input_ids=ids, positions=positions, renumber=renumber, mask=mask, want_mask=mask_kind != "none")
    with torch.no_grad():
        assert_same(compact_prompt(*args, backend="triton", **kw), compact_prompt_ref(*args, **kw))


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_prompt_from_inputs_embeds(dtype):
    """Re-padded slots of inputs_embeds are zeros; rows that keep the same count are not re-padded."""
    batch, length, dim = 2, 577, 80
    ids, is_image, kept = make_prompt(batch, length, seed=2)
    inputs_embeds = torch.randn(batch, length, dim, device=DEVICE).to(dtype)
    features = torch.randn(int(kept.sum()), dim, device=DEVICE).to(dtype)
    for lengths_kept in (kept, torch.ones_like(kept)):
        lengths = row_lengths(is_image, lengths_kept)
        n_kept = int(lengths_kept.sum())
        args = (is_image, lengths_kept, features[:n_kept] if n_kept <= len(features) else
                torch.randn(n_kept, dim, device=DEVICE).to(dtype), lengths, False, None)
        kw = dict(inputs_embeds=inputs_embeds, renumber=False, want_mask=False)
        assert_same(compact_prompt(*args, backend="triton", **kw), compact_prompt_ref(*args, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch, length", [(1, 63), (3, 577)])
def test_compact_prompt_reads_kept_rows_from_a_row_per_placeholder(dtype, batch, length):
    """features_per_placeholder: [S, D] holds every placeholder's token and the kept ones are
    copied from there -- the same result as handing over only the kept rows."""
    dim = 48
    ids, is_image, kept = make_prompt(batch, length, seed=5)
    embedding = torch.nn.Embedding(VOCAB, dim).to(DEVICE, dtype)
    source = torch.randn(int(is_image.sum()), dim, device=DEVICE).to(dtype)
    for left_padded in (True, False):
        args = (row_lengths(is_image, kept), left_padded, embedding)
        kw = dict(input_ids=ids, pad_id=3, want_mask=True)
        with torch.no_grad():
            expected = compact_prompt_ref(is_image, kept, source[kept], *args, **kw)
            for backend in ("triton", "torch"):
                got = compact_prompt(is_image, kept, source, *args, features_per_placeholder=True,
                                     backend=backend, **kw)
                assert_same(got, expected)


def test_compact_prompt_falls_back_for_an_embedding_it_cannot_read():
    """An embedding module that is not a plain lookup table takes the reference path."""
    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2

    ids, is_image, kept = make_prompt(1, 63, seed=3)
    embedding = Scaled(VOCAB, 8).to(DEVICE)
    features = torch.randn(int(kept.sum()), 8, device=DEVICE)
    args = (is_image, kept, features, row_lengths(is_image, kept), True, embedding)
    with torch.no_grad():
        got = compact_prompt(*args, input_ids=ids, backend="triton")
    assert not is_image[0, 0]  # column 0 is text and lands in slot 0
    torch.testing.assert_close(got.embeds[0, 0], 2 * embedding.weight[ids[0, 0]].detach())

def test_compact_prompt_needs_ids_or_embeds():
    ids, is_image, kept = make_prompt(1, 63, seed=4)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        compact_prompt(is_image, kept, torch.zeros(int(kept.sum()), 4), [63], True, None)


@pytest.mark.parametrize("tokens", [63, 577])
def test_top_k_in_order_on_the_triton_backend(tokens):
    """Indices only (no features to gather): the kernel's feature grid must still write them."""
    scores = torch.randn(3, tokens, device=DEVICE)
    for k in (1, tokens // 3, tokens - 1):
        assert torch.equal(top_k_in_order(scores, k, backend="triton"), top_k_in_order_ref(scores, k))


@pytest.mark.parametrize("tokens, dim", [(63, 16), (577, 80)])
def test_top_k_selection_gathers_only_when_read(tokens, dim):
    """The fused selection (slots) and the reference one (index) agree on keep, index and
    features; the fused one launches its gather only when features or index are read."""
    from vlm_prune.kernels import top_k_selection

    features = torch.randn(3, tokens, dim, device=DEVICE)
    scores = torch.randn(3, tokens + 1, device=DEVICE)[:, 1:]  # rows past a [CLS] column: strided
    scores[1, 5:40] = scores[1, 4]  # ties go to the lower index
    for k in (1, tokens // 4, tokens - 1):
        fused = top_k_selection(features, scores, k, backend="triton")
        reference = top_k_selection(features, scores, k, backend="torch")
        assert fused.slots is not None and reference.slots is None
        assert fused._features is None and fused._index is None  # nothing gathered yet
        assert torch.equal(fused.keep, reference.keep)
        assert fused.keep.sum(1).tolist() == [k] * 3
        assert torch.equal(fused.index, reference.index)
        assert torch.equal(fused.index, top_k_in_order_ref(scores, k))
        assert torch.equal(fused.features, reference.features)
        assert torch.equal(fused.features, features[torch.arange(3)[:, None], reference.index])


def test_auto_backend_falls_back_to_the_reference_when_a_kernel_fails(monkeypatch):
    """backend="auto" never fails a prefill that "torch" would run: a kernel that raises (it does
    not compile for this GPU, say) warns once and its reference runs from then on; "triton" raises."""
    from vlm_prune.kernels import dispatch

    monkeypatch.setattr(dispatch, "_failed", set())
    monkeypatch.setattr(dispatch, "use_triton", lambda tensor, backend=None: True)  # as on a CUDA tensor
    calls = []

    def broken():
        calls.append("fused")
        raise RuntimeError("PassManager::run failed")

    x = torch.zeros(1)
    with pytest.warns(RuntimeWarning, match="'demo_kernel' failed.*PassManager"):
        assert dispatch.fused_or_reference("demo_kernel", x, broken, lambda: "ref", "auto") == "ref"
    assert dispatch.fused_or_reference("demo_kernel", x, broken, lambda: "ref", "auto") == "ref"
    assert calls == ["fused"]  # not retried
    with pytest.raises(RuntimeError, match="PassManager"):
        dispatch.fused_or_reference("demo_kernel", x, broken, lambda: "ref", "triton")
    assert dispatch.fused_or_reference("other_kernel", x, lambda: "fused", lambda: "ref", "auto") == "fused"
