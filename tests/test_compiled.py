"""`vlm_prune.compile_language_model`: the language model compiled for prefill (padded to length
buckets) and decode (a static cache), under vision-stage pruning.

The reference is the uncompiled pruned model with transformers' default (dynamic) cache: the
compiled path must give its greedy tokens and, within float tolerance, its logits. Most tests
compile with dynamo's "eager" backend (the same graphs, traced and guarded, without inductor's
code generation: seconds instead of minutes on a CPU); the slow tests compile with inductor
and check that each bucket's graph is compiled once and reused for every length in it."""

from __future__ import annotations

import pytest
import torch

import vlm_prune
from vlm_prune import tiny
from vlm_prune.compiled import DEFAULT_BUCKETS, compile_language_model, get_compiled, vision_stage_methods

from .test_families import BUILD, make_inputs, prompt, two_prompts

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
BUCKETS = (32, 64, 128, 256)


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kw)


def _no_cache_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _assert_same(got, want):
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _single(family, processor, question, size=(280, 196), seed=0):
    """One prompt with one image (batch 1)."""
    if family == "llava":
        return processor(images=[tiny.random_image(64, 48, seed=seed)], text=[prompt("llava_next", question)],
                         return_tensors="pt")
    return make_inputs(processor, family, [size], [question], seeds=[seed])


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model, processor = BUILD[request.param]()
    yield request.param, model, processor
    vlm_prune.uncompile_language_model(model)
    vlm_prune.unpatch(model)


@pytest.mark.parametrize("method", [None, "cls_attention", "pool"])
def test_compiled_generate_equals_the_uncompiled_pruned_model(family_model, method):
    """A padded batch of two prompts of different image sizes: generate() (prefill padded to a
    bucket, decode on a static cache) and a forward without a cache give the uncompiled model's
    tokens and logits (Qwen: M-RoPE positions [3/4, B, L] padded with the sequence)."""
    family, model, processor = family_model
    inputs = two_prompts(family, processor)
    if method is not None:
        vlm_prune.patch(model, method, 0.25)
    try:
        want, want_logits = _generate(model, inputs), _no_cache_logits(model, inputs)
        compiled = compile_language_model(model, buckets=BUCKETS, backend="eager")
        try:
            got = _generate(model, inputs)
            got_logits = _no_cache_logits(model, inputs)
            assert compiled.stats["eager"] == 0
            assert sum(compiled.stats["prefill"].values()) == 2 and compiled.stats["decode"] == 3
            assert compiled.last_prefill["bucket"] == compiled.bucket(compiled.last_prefill["length"])
            assert compiled.last_prefill["bucket"] > compiled.last_prefill["length"]  # padding was added
        finally:
            compiled.remove()
    finally:
        vlm_prune.unpatch(model)
    _assert_same(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positions", ["original", "renumber"])
def test_llava_position_policies(positions):
    """Kept tokens numbered with gaps (original) or consecutively (renumber): the padded
    prefill and the decode steps keep the engine's numbering."""
    model, processor = BUILD["llava"]()
    inputs = two_prompts("llava", processor)
    vlm_prune.patch(model, "cls_attention", 16, positions=positions)
    want = _generate(model, inputs)
    compile_language_model(model, buckets=BUCKETS, backend="eager")
    _assert_same(_generate(model, inputs), want)


def test_a_prompt_longer_than_the_largest_bucket_runs_uncompiled():
    model, processor = BUILD["llava"]()
    inputs = two_prompts("llava", processor)
    vlm_prune.patch(model, "cls_attention", 0.5)
    want = _generate(model, inputs)
    compiled = compile_language_model(model, buckets=(8,), backend="eager")
    _assert_same(_generate(model, inputs), want)
    assert compiled.stats["eager"] == 1 and not compiled.stats["prefill"]  # the prefill
    assert compiled.stats["decode"] == 3  # the decode steps are compiled still


@pytest.mark.parametrize("reuse_cache", [True, False])
def test_generate_calls_reuse_one_static_cache(reuse_cache):
    """With reuse_cache, every generate() call decodes into the same static cache buffers (so a
    CUDA graph replays on them), reset at each call; the second prompt is exact too."""
    model, processor = BUILD["qwen2_vl"]()
    first = _single("qwen2_vl", processor, "What is it?")
    second = _single("qwen2_vl", processor, "How many shapes are there in the picture?", size=(100, 300), seed=1)
    vlm_prune.patch(model, "cls_attention", 0.25)
    want = [_generate(model, inputs) for inputs in (first, second)]
    compiled = compile_language_model(model, buckets=BUCKETS, backend="eager", reuse_cache=reuse_cache)
    got = [_generate(model, inputs) for inputs in (first, second)]
    for g, w in zip(got, want):
        _assert_same(g, w)
    caches = [out.cache for out in got]
    assert (caches[0] is caches[1]) == reuse_cache
    same_buffers = caches[0].layers[0].keys.data_ptr() == caches[1].layers[0].keys.data_ptr()
    assert same_buffers == reuse_cache
    assert caches[1].get_max_length() == compiled.max_cache_len == BUCKETS[-1] + 512


def test_a_hand_written_loop_on_the_handles_static_cache():
    """`static_cache()`: a forward's prefill and decode steps by hand, as a serving loop would."""
    model, processor = BUILD["llava"]()
    inputs = _single("llava", processor, "What is it?")
    vlm_prune.patch(model, "pool", 0.25)
    want = _generate(model, inputs)
    compiled = compile_language_model(model, buckets=BUCKETS, backend="eager")
    cache = compiled.static_cache(batch_size=1)
    steps, ids, mask = [], inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        out = model(**inputs, cache=cache)
        for _ in range(3):
            steps.append(out.logits[:, -1])
            ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            out = model(input_ids=ids[:, -1:], attention_mask=mask, cache=cache)
        steps.append(out.logits[:, -1])
    assert compiled.stats["decode"] == 3 and sum(compiled.stats["prefill"].values()) == 1
    torch.testing.assert_close(torch.stack(steps), torch.stack(want.logits), rtol=1e-4, atol=1e-4)
    assert torch.equal(ids[:, inputs["input_ids"].shape[1]:], want.sequences[:, inputs["input_ids"].shape[1]:-1])


def test_the_cuda_graph_steps_keep_the_outputs():
    """What a CUDA-graph mode adds on the host (a new step marked before each call, the outputs
    copied out of the graph's buffers), run here on the CPU: the same tokens and logits."""
    model, processor = BUILD["llava"]()
    inputs = two_prompts("llava", processor)
    vlm_prune.patch(model, "cls_attention", 0.25)
    want = _generate(model, inputs)
    compiled = compile_language_model(model, buckets=BUCKETS, backend="eager")
    compiled.cuda_graphs = True
    _assert_same(_generate(model, inputs), want)


@pytest.mark.parametrize("method, options", [("fastv", {"layer": 1}), ("transition", {}), ("visiondrop", {}),
                                             ("cls_attention+fastv", {})])
def test_in_llm_methods_are_refused(method, options):
    model, _ = BUILD["llava"](text_layers=4)
    lm = model.model.language_model
    keep = (0.5, 0.25) if "+" in method else 0.25
    vlm_prune.patch(model, method, keep, **options)
    config = model.generation_config.to_dict()
    with pytest.raises(ValueError, match="prunes inside the language model") as error:
        compile_language_model(model, backend="eager")
    for name in vision_stage_methods():
        assert name in str(error.value)
    assert "forward" not in vars(lm) and get_compiled(model) is None
    assert model.generation_config.to_dict() == config


def test_an_in_llm_method_patched_after_compiling_is_refused_at_the_forward():
    model, processor = BUILD["llava"](text_layers=4)
    inputs = two_prompts("llava", processor)
    compile_language_model(model, buckets=BUCKETS, backend="eager")
    vlm_prune.patch(model, "fastv", 0.25, layer=1)
    with pytest.raises(ValueError, match="fastv"):
        _generate(model, inputs)
    vlm_prune.patch(model, "cls_attention", 0.25)  # a vision-stage method again: runs
    assert _generate(model, inputs).sequences.shape[0] == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(buckets=()), "buckets"), (dict(buckets=(0, 64)), "buckets"), (dict(buckets=("64",)), "buckets"),
    (dict(buckets=5), "buckets"), (dict(mode="fast"), "mode"), (dict(max_cache_len=64, buckets=(64,)), "max_cache_len"),
])
def test_bad_arguments_are_refused(llava, kwargs, match):
    model, _ = llava
    with pytest.raises(ValueError, match=match):
        compile_language_model(model, **kwargs)
    assert "forward" not in vars(model.model.language_model) and get_compiled(model) is None


def test_unsupported_families_are_refused():
    model, _ = tiny.qwen3_vl()
    with pytest.raises(ValueError, match="qwen3_vl"):
        compile_language_model(model)


def test_remove_restores_the_model(llava):
    model, _ = llava
    lm = model.model.language_model
    config = model.generation_config.to_dict()
    compiled = compile_language_model(model)
    assert compiled.buckets == DEFAULT_BUCKETS and compiled.mode == "default"  # a CPU model
    assert "forward" in vars(lm) and model.generation_config.cache_implementation == "static"
    again = compile_language_model(model, buckets=(16, 8), mode="max-autotune-no-cudagraphs")  # replaces
    assert not compiled.active and again.active and again.buckets == (8, 16)
    vlm_prune.uncompile_language_model(model)
    vlm_prune.uncompile_language_model(model)  # idempotent
    assert "forward" not in vars(lm) and "_prepare_static_cache" not in vars(model)
    assert model.generation_config.to_dict() == config and get_compiled(model) is None


# -- inductor --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_inductor_reuses_one_graph_per_bucket(family):
    """Inductor (CPU): batch-1 prompts of different pruned lengths in one bucket, pruned with
    cls_attention and with pool, give the uncompiled pruned model's tokens and logits; the
    first prompt compiles one prefill graph (its bucket) and one decode graph, and nothing
    after it compiles again (dynamo's error_on_recompile is on). LLaVA: a forward without a
    cache (scoring) compiles the prefill once more, without the cache's copies, and gives the
    uncompiled logits."""
    model, processor = BUILD[family]()
    prompts = [_single(family, processor, "What is it?"),
               _single(family, processor, "How many green triangles are there in the picture?", seed=1)]
    methods = ["cls_attention", "pool"]
    want = {}
    for method in methods:
        vlm_prune.patch(model, method, 0.25)
        want[method] = [_generate(model, inputs) for inputs in prompts]
    want_scores = _no_cache_logits(model, prompts[1])  # pool
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = compile_language_model(model, buckets=(64, 128))
    lengths = set()
    for i, method in enumerate(methods):
        vlm_prune.patch(model, method, 0.25)
        for j, inputs in enumerate(prompts):
            with torch._dynamo.config.patch(error_on_recompile=(i, j) != (0, 0)):
                got = _generate(model, inputs)
            _assert_same(got, want[method][j])
            lengths.add(compiled.last_prefill["length"])
            assert compiled.last_prefill["bucket"] == 64
    assert len(lengths) >= 2  # different pruned lengths, one bucket
    assert compiled.stats["eager"] == 0 and compiled.stats["prefill"][64] == 4
    assert counters["stats"]["unique_graphs"] == 2 and not counters["recompiles"]
    if family == "llava":
        torch.testing.assert_close(_no_cache_logits(model, prompts[1]), want_scores, rtol=1e-4, atol=1e-4)
        assert counters["stats"]["unique_graphs"] == 3 and compiled.stats["eager"] == 0
    vlm_prune.unpatch(model)


# -- a GPU (skipped without CUDA) --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_cuda_graphs_replay_the_buckets_graph(family):
    """On a GPU the default mode is "reduce-overhead": the prefill and decode graphs run as CUDA
    graphs (inductor skipped none), on the pooled static cache's buffers, and give the
    uncompiled pruned model's tokens (logits within 1e-3)."""
    model, processor = BUILD[family]()
    model = model.to("cuda")
    prompts = [{k: v.to("cuda") for k, v in _single(family, processor, question, seed=i).items()}
               for i, question in enumerate(["What is it?", "How many green triangles are there in the picture?"])]
    vlm_prune.patch(model, "cls_attention", 0.25)
    want = [_generate(model, inputs) for inputs in prompts]
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = compile_language_model(model, buckets=(64, 128))
    assert compiled.mode == "reduce-overhead" and compiled.cuda_graphs
    for _ in range(2):  # the second pass replays what the first recorded
        for inputs, w in zip(prompts, want):
            got = _generate(model, inputs)
            assert torch.equal(got.sequences, w.sequences)
            for a, b in zip(got.logits, w.logits):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert compiled.stats["eager"] == 0 and not counters["inductor"]["cudagraph_skips"]
    assert counters["stats"]["unique_graphs"] == 2
    vlm_prune.unpatch(model)
