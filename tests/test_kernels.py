"""Every Triton kernel against its reference: fp32 and fp16, odd sizes (63, 577, 2340 tokens;
head dims 64/80/128), batches 1-3, variable k, NaN-filled scratch memory. On CPU the kernels run
in the Triton interpreter (TRITON_INTERPRET=1, set in conftest); bf16 runs on GPU only (the
interpreter's bf16 arithmetic is wrong)."""

from __future__ import annotations

import os

import pytest
import torch

import vlm_prune
from vlm_prune import tiny
from vlm_prune.kernels import cls_attention_scores_ref, top_k_in_order_ref, transition_variation_ref
from vlm_prune.kernels.dispatch import interpreting

triton_kernels = pytest.importorskip("vlm_prune.kernels.triton_kernels", reason="Triton is not installed")
tl = pytest.importorskip("triton.language")
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
GPU_ONLY = pytest.mark.skipif(DEVICE != "cuda", reason="GPU only: the interpreter's bf16 arithmetic is wrong")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=GPU_ONLY)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
pytestmark = pytest.mark.usefixtures("garbage_buffers")  # every kernel buffer starts as garbage


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, heads, tokens, head_dim", [(1, 2, 63, 64), (3, 2, 577, 80), (2, 1, 2340, 128)])
def test_cls_attention_row(dtype, batch, heads, tokens, head_dim):
    torch.manual_seed(tokens)
    query = torch.randn(batch, heads, head_dim, device=DEVICE).to(dtype)
    keys = torch.randn(batch, heads, tokens, head_dim, device=DEVICE).to(dtype)
    if batch == 3:  # the layout the patches pass: a [B, T, H, Dh] projection viewed per head
        keys = keys.transpose(1, 2).contiguous().transpose(1, 2)
    scale = head_dim**-0.5
    got = triton_kernels.cls_attention_scores(query, keys, scale)
    expected = cls_attention_scores_ref(query, keys, scale)
    torch.testing.assert_close(got, expected, rtol=TOL[dtype], atol=TOL[dtype] / tokens)
    torch.testing.assert_close(got.sum(-1), torch.ones(batch, device=DEVICE), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [63, 577, 2340])
def test_topk_slots_with_variable_k_and_ties(tokens):
    torch.manual_seed(tokens)
    scores = torch.randn(4, tokens, device=DEVICE)
    scores[1] = torch.randint(0, 5, (tokens,), device=DEVICE).float()  # heavy ties
    scores[2] = -scores[2].abs()  # all negative, with the extremes of the int32 key range
    scores[2, :3] = torch.tensor([-0.0, -3.0e38, -1.0e-38])
    scores[3] = scores[3] * 1e-3
    scores[3, ::7] = 0.0  # +0.0 ties ...
    scores[3, 3::7] = -0.0  # ... with -0.0, which compare equal
    ks = torch.tensor([1, tokens // 3, tokens - 1, tokens // 2])
    scratch = torch.full((4, tokens), -7, dtype=torch.int32, device=DEVICE)  # garbage scratch
    slots = triton_kernels.topk_slots(scores, ks, out=scratch)
    same_k = triton_kernels.topk_slots(scores, int(ks[1]))  # one k for every row: a scalar argument
    assert torch.equal(same_k[1], slots[1])
    for row, k in enumerate(ks.tolist()):
        expected = torch.full((tokens,), -1, dtype=torch.int32, device=DEVICE)
        expected[top_k_in_order_ref(scores[row:row + 1], k)[0]] = torch.arange(k, dtype=torch.int32, device=DEVICE)
        assert torch.equal(slots[row], expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, dim, width", [(63, 64, 7), (577, 80, 64), (2340, 128, 585)])
def test_compact_gather_writes_every_slot(dtype, tokens, dim, width):
    torch.manual_seed(dim)
    features = torch.randn(2, tokens, dim, device=DEVICE).to(dtype)
    mask = torch.zeros(2, tokens, dtype=torch.bool, device=DEVICE)
    for row in range(2):
        mask[row, torch.randperm(tokens, device=DEVICE)[:width]] = True
    out = torch.full((2, width, dim), float("nan"), device=DEVICE).to(dtype)
    index = torch.full((2, width), -99, dtype=torch.int64, device=DEVICE)
    slots = triton_kernels.slots_from_mask(mask)
    got, got_index = triton_kernels.compact_gather(features, slots, width, out=out, index=index)
    for row in range(2):
        expected_index = mask[row].nonzero().flatten()
        assert torch.equal(got_index[row], expected_index)
        assert torch.equal(got[row], features[row, expected_index])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", ["signed", "abs"])
@pytest.mark.parametrize("batch, tokens, dim", [(1, 63, 64), (3, 577, 80), (2, 700, 128)])
def test_transition_variation(dtype, direction, batch, tokens, dim):
    torch.manual_seed(tokens)
    t_in = torch.randn(batch, tokens, dim, device=DEVICE).to(dtype)
    t_out = torch.randn(batch, tokens, dim, device=DEVICE).to(dtype)
    visual = torch.rand(batch, tokens, device=DEVICE) < 0.6
    visual[0] = False if batch > 1 else visual[0]  # a row without visual tokens
    scratch = torch.full((batch, 2 * tokens), float("nan"), device=DEVICE)
    got = triton_kernels.transition_variation(t_in, t_out, visual, direction, scratch=scratch)
    expected = transition_variation_ref(t_in, t_out, visual, direction)
    torch.testing.assert_close(got, expected, rtol=TOL[dtype] * 10, atol=TOL[dtype] / 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bounds, heads, head_dim, unit", [
    ([0, 63], 2, 80, 1),
    ([0, 36, 136, 200], 3, 64, 4),  # three segments, none aligned to the kernels' 64-token blocks
    ([0, 577], 1, 128, 1),
    ([0, 20, 40], 4, 8, 4),  # a head dim under tl.dot's smallest width (the tiny test models')
])
def test_attention_received_rotary(dtype, bounds, heads, head_dim, unit):
    from vlm_prune.kernels.attention_received import attention_received_rotary, attention_received_rotary_ref

    torch.manual_seed(bounds[-1])
    tokens = bounds[-1]
    # the layout the Qwen patch passes: q and k are views into the block's fused qkv output
    qkv = torch.randn(tokens, 3, heads, head_dim, device=DEVICE).to(dtype)
    query, keys = qkv[:, 0], qkv[:, 1]
    angles = torch.rand(tokens, head_dim // 2, device=DEVICE) * 6
    angles = torch.cat([angles, angles], dim=-1)
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    args = (query, keys, angles.cos(), angles.sin(), head_dim**-0.5, cu, unit)
    got = attention_received_rotary(*args, backend="triton")
    expected = attention_received_rotary_ref(*args)
    torch.testing.assert_close(got, expected, rtol=TOL[dtype] * 10, atol=TOL[dtype] / tokens)
    # each row's probabilities sum to 1, so each segment's tokens receive 1 in all
    torch.testing.assert_close(got.sum() * unit, torch.tensor(len(bounds) - 1.0, device=DEVICE), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("chunk", [None, 7, 1024])
def test_attention_received_reference_equals_the_full_map(chunk):
    """The chunked reference against the whole attention map of each segment: query rows in
    chunks of 7, in one chunk, and cache-sized (CPU: 4 MiB of scores -> 46 of 2850 rows here,
    so segments span several chunks and chunk ends fall inside segments)."""
    from vlm_prune.kernels.attention_received import attention_received

    torch.manual_seed(0)
    heads, head_dim, bounds = 3, 16, [0, 577, 2850]
    query = torch.randn(heads, bounds[-1], head_dim, device=DEVICE) * 2
    keys = torch.randn(heads, bounds[-1], head_dim, device=DEVICE) * 2
    cu = torch.tensor(bounds, device=DEVICE)
    got = attention_received(query, keys, head_dim**-0.5, cu, chunk=chunk)
    expected = torch.cat([
        torch.softmax(query[:, a:b] @ keys[:, a:b].transpose(-1, -2) * head_dim**-0.5, dim=-1).mean(dim=(0, 1))
        for a, b in zip(bounds[:-1], bounds[1:])])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("family, method", [
    ("llava", "cls_attention"), ("llava", "transition"),
    ("llava_next", "cls_attention"),  # two rows of different lengths: re-padded compaction
    ("qwen2_vl", "cls_attention"), ("qwen2_5_vl", "cls_attention"),  # fused attention received, M-RoPE
])
def test_triton_backend_end_to_end(family, method):
    """The whole patch with backend="triton" (kernels) equals backend="torch" (references)."""
    from .conftest import llava_inputs
    from .test_families import QUESTIONS, SIZES, make_inputs

    if family == "llava":
        model, processor = tiny.llava(seed=0)
        inputs = llava_inputs(processor, ["USER: <image>\nWhat is it? ASSISTANT:"], [(140, 100)])
    else:
        model, processor = tiny.llava_next() if family == "llava_next" else tiny.qwen2_vl(
            version="2.5" if family == "qwen2_5_vl" else "2")
        inputs = make_inputs(processor, family, SIZES, QUESTIONS)
    model.to(DEVICE)
    inputs = inputs.to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        handle = vlm_prune.patch(model, method, 9, backend=backend)
        with torch.no_grad():
            logits = model(**inputs).logits
        results[backend] = ([i.tolist() for i in handle.kept_indices], logits)
        handle.remove()
    assert results["torch"][0] == results["triton"][0]
    torch.testing.assert_close(results["torch"][1], results["triton"][1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_triton_backend_copies_kept_tokens_straight_from_the_tower(monkeypatch):
    """A batch of whole images under one fused top-k: the compaction reads the kept rows from
    the tower's output (no gather first) and the result is the reference's, in the prefill and
    in generate(use_cache=False), whose later steps replay the prompt's reduction. The tower's
    output is not held after a prefill that no replay can follow, nor after generate() returns."""
    from vlm_prune.patches import vision_stage as base

    from .conftest import llava_inputs

    compact_prompt, per_placeholder = base.compact_prompt, []

    def recording(*args, **kwargs):
        per_placeholder.append(kwargs["features_per_placeholder"])
        return compact_prompt(*args, **kwargs)

    monkeypatch.setattr(base, "compact_prompt", recording)
    model, processor = tiny.llava(seed=0)
    model.to(DEVICE)
    inputs = llava_inputs(processor, ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nAnd this? ASSISTANT:"],
                          [(140, 100), (90, 120)]).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        handle = vlm_prune.patch(model, "cls_attention", 9, backend=backend)
        with torch.no_grad():
            logits = model(**inputs).logits
            assert handle._patch.state.reduced is None
            assert per_placeholder.pop() == (backend == "triton")
            seen = []  # the generate() call's own prompt state, at each of its forwards
            hook = model.model.register_forward_hook(lambda module, args, out: seen.append(handle._patch.state))
            tokens = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=False)
            assert len({id(s) for s in seen}) == 1 and seen[0].reduced is None  # held for the replays, released at return
            assert [s["kept"] for s in handle.stats] == [9, 9]
            seen.clear()
            cached = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            hook.remove()
            assert seen[0].reduced is None
        assert per_placeholder == [backend == "triton"] * 2  # one prefill per generate()
        per_placeholder.clear()
        assert torch.equal(tokens, cached)
        results[backend] = ([i.tolist() for i in handle.kept_indices], logits, tokens)
        handle.remove()
    assert results["torch"][0] == results["triton"][0]
    torch.testing.assert_close(results["torch"][1], results["triton"][1], rtol=1e-4, atol=1e-5)
    assert torch.equal(results["torch"][2], results["triton"][2])


def _signature_probe(x_ptr, n, scale, flag, BLOCK: tl.constexpr):  # a kernel's parameters, never run
    pass


def test_launch_signature_is_finer_than_tritons_specialisation():
    """The cached launcher (`launch.launch`, GPU only) serves a compiled kernel to a later call
    only when the signature matches: what Triton specialises on (tensor dtype and 16-byte
    alignment; an int equal to 1, a multiple of 16, in 32 or 64 bits) and every constexpr and
    launch option must tell calls apart; values Triton does not specialise on must not."""
    from triton.runtime.jit import JITFunction

    from vlm_prune.kernels.launch import _signature

    kernel = JITFunction(_signature_probe)  # a real JITFunction (its parameters), not compiled here
    x = torch.zeros(64)

    def sig(*args, **kwargs):
        return _signature(kernel, args, kwargs)

    same = sig(x[:32], 577, 0.5, True, BLOCK=64)
    assert sig(x[4:36], 3, 2.5, True, BLOCK=64) == same  # another aligned view, odd int, any float
    for other in (sig(x[1:33], 577, 0.5, True, BLOCK=64),  # unaligned
                  sig(x[:32].double(), 577, 0.5, True, BLOCK=64),  # dtype
                  sig(x[:32], 1, 0.5, True, BLOCK=64), sig(x[:32], 48, 0.5, True, BLOCK=64),  # == 1, % 16
                  sig(x[:32], 1 << 40, 0.5, True, BLOCK=64), sig(x[:32], 577, 0.5, False, BLOCK=64),
                  sig(x[:32], 577, 0.5, True, BLOCK=128), sig(x[:32], 577, 0.5, True, BLOCK=64, num_warps=8),
                  sig(x[:32], 577, 0.5, True, 64)):  # the constexpr positionally: another binding
        assert other != same


@pytest.mark.skipif(DEVICE != "cuda", reason="GPU only: under the interpreter `launch` takes Triton's own path")
def test_cached_launch_equals_triton_launch_per_specialisation():
    """`launch.launch` calls a compiled kernel's launcher straight from its cache, keyed finer than
    Triton's specialisation: an unaligned view, an int equal to 1 or a multiple of 16 and a new
    dtype each get their own entry, and every launch equals Triton's own and the reference."""
    from vlm_prune.kernels import launch as launcher
    from vlm_prune.kernels.host_calls import count_host_calls

    torch.manual_seed(0)
    base = torch.randn(3, 1 + 640, device=DEVICE)
    cases = [(base[:, 1:578], 64), (base[:, :577], 64), (base[:, :577].double(), 1), (base[:, :64], 16),
             (base[:1, 1:2], 1)]  # unaligned view / aligned / fp64 with k 1 / 64 tokens, k 16 / one token
    launcher._cache.clear()
    for n, (scores, k) in enumerate(cases, start=1):
        expected = torch.full(scores.shape, -1, dtype=torch.int32, device=DEVICE)
        for row in range(scores.shape[0]):
            kept = top_k_in_order_ref(scores[row:row + 1], k)[0]
            expected[row, kept] = torch.arange(len(kept), dtype=torch.int32, device=DEVICE)
        first = triton_kernels.topk_slots(scores, k)  # a new signature: Triton's path, then cached
        assert launcher.cached_signatures() == n
        with count_host_calls() as calls:
            cached = triton_kernels.topk_slots(scores, k)  # served from the cache, counted as a launch
        assert calls.launches == 1 and launcher.cached_signatures() == n
        with launcher.uncached():
            own = triton_kernels.topk_slots(scores, k)  # Triton's own launch
        assert torch.equal(first, expected) and torch.equal(cached, expected) and torch.equal(own, expected)


@pytest.mark.parametrize("family, batch, launches, extra_ops", [
    ("llava", 1, 5, 5), ("llava", 2, 5, 5),  # [CLS] row (2), top-k slots, compaction (2); no gather
    ("qwen2_vl", 1, 7, 0),  # + rotary and two attention-received passes instead of the [CLS] row
    ("qwen2_vl", 2, 8, 0),  # images of two sizes: a top-k per size, still no gather
    ("llava_next", 1, 6, 14),  # base image and crop grid: a top-k each; keep flags set per region
])
def test_pruning_adds_few_host_calls(family, batch, launches, extra_ops):
    """A GPU prefill at these sizes is host-bound, so what the pruning costs is the host calls it
    adds (`count_host_calls`; on CPU through the interpreter, on a GPU compiled). With the Triton backend a pruned
    prefill launches a fixed number of kernels, whatever the batch, adds at most `extra_ops`
    PyTorch ops to the unpruned prefill's and reads the device no more often."""
    from vlm_prune.kernels.host_calls import count_host_calls

    from .conftest import llava_inputs
    from .test_families import QUESTIONS, SIZES, make_inputs

    if family == "llava":
        model, processor = tiny.llava(seed=0)
        inputs = llava_inputs(processor, ["USER: <image>\nWhat is it? ASSISTANT:"] * batch,
                              [(140, 100), (90, 120)][:batch])
    else:
        model, processor = tiny.llava_next() if family == "llava_next" else tiny.qwen2_vl(version="2")
        inputs = make_inputs(processor, family, SIZES[:batch], QUESTIONS[:batch])
    model.to(DEVICE)
    inputs = inputs.to(DEVICE)
    with torch.no_grad():
        model(**inputs)
        with count_host_calls() as unpruned:
            model(**inputs)
        # LLaVA-NeXT: budget per image (cls_attention's default is the release's per crop: more regions)
        budget = {"budget": "per_image"} if family == "llava_next" else {}
        with vlm_prune.pruned(model, "cls_attention", 9, backend="triton", **budget):
            model(**inputs)
            with count_host_calls() as pruned:
                model(**inputs)
    assert unpruned.launches == 0 and unpruned.ops > 100
    assert pruned.launches == launches
    assert pruned.ops <= unpruned.ops + extra_ops, (pruned.op_names, unpruned.op_names)
    assert pruned.reads <= unpruned.reads


@pytest.mark.slow
def test_every_kernel_compiles_for_gpus_within_their_shared_memory():
    """The interpreter never meets the compiler: compile each kernel, as the launchers configure
    it, to sm_90 and sm_86 machine code (Triton's own LLVM and ptxas, no GPU needed) and check
    its shared memory against each architecture's per-block limit."""
    import subprocess
    import sys

    from vlm_prune.kernels.compile_check import configurations

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "vlm_prune.kernels.compile_check", "--arch", "90", "86"],
                            env=env, capture_output=True, text=True, timeout=1200)
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert result.stdout.count("\nok   ") + result.stdout.startswith("ok   ") == 2 * len(configurations()), report


@pytest.mark.slow
@pytest.mark.skipif(not interpreting(), reason="the smoke mode checks the bench script on CPU; a GPU runs the bench itself")
def test_kernel_bench_smoke(capsys, tmp_path):
    """The GPU bench script itself runs (tiny sizes, interpreter; its timings mean nothing), every
    row of it: a row that raises is reported on stderr and left out of the tables. Its numbers and
    printed tables land in --out."""
    import json

    from vlm_prune.kernels import bench

    assert bench.main(["--smoke", "--out", str(tmp_path), "--json", str(tmp_path / "also.json")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "[CLS] attention row" in out and "prefill compaction" in out and "| triton |" in out
    failures = [line for line in captured.err.splitlines() if line.startswith("[bench]") and "not measured" not in line]
    assert not failures, failures
    saved, = tmp_path.glob("kernels-*.json")
    data = json.loads(saved.read_text())
    assert data == json.loads((tmp_path / "also.json").read_text())
    assert {r["backend"] for r in data["overhead"]} == set(bench.VARIANTS)
    assert all(r["timings"]["eager"]["variants"]["triton"]["time"]["n"] == 1 for r in data["kernels"])
    log = saved.with_name(saved.name[:-5] + ".txt").read_text()
    assert "| triton |" in log and "| torch sync | select |" in log
