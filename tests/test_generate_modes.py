"""generate() modes beyond greedy with a dynamic cache: beam search and several returned
sequences (generate repeats each prompt's images after encoding them once), a static KV cache
(generate prepares 4D masks sized to the cache), and caches reused across calls (a second chat
turn, conversations in turns)."""

from __future__ import annotations


import copy

import pytest
import torch

import vlm_prune
from vlm_prune import tiny

from .test_families import BUILD, make_inputs, two_prompts

FAMILIES = ["llava", "llava_next", "qwen2_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model, processor = BUILD[request.param]()
    yield request.param, model, two_prompts(request.param, processor)
    vlm_prune.unpatch(model)


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, output_logits=True,
                              return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("mode", [dict(num_beams=2, do_sample=False),
                                  dict(num_return_sequences=2, do_sample=True, top_k=4)])
def test_each_repeated_prompt_gets_its_own_images(family_model, mode):
    _, model, inputs = family_model
    with vlm_prune.pruned(model, "cls_attention", 0.5) as handle:
        with torch.no_grad():
            want = model(**inputs).logits[:, -1]  # the pruned prefill of each prompt, once
        torch.manual_seed(0)
        out = _generate(model, inputs, **mode)
        assert len(handle.stats) == 4  # the prefill ran on the 2 x 2 repeated prompts
        assert all(s["kept"] < s["visual_tokens"] for s in handle.stats)
    first = out.logits[0]  # [4, V]: prompt 0 twice, then prompt 1 twice
    torch.testing.assert_close(first, want.repeat_interleave(2, dim=0), rtol=1e-4, atol=1e-4)


def test_static_cache_generates_what_the_dynamic_cache_does(family_model):
    _, model, inputs = family_model
    with vlm_prune.pruned(model, "cls_attention", 0.5) as handle:
        dynamic = _generate(model, inputs, do_sample=False)
        static = _generate(model, inputs, do_sample=False, cache_implementation="static")
        assert all(s["kept"] < s["visual_tokens"] for s in handle.stats)
    assert torch.equal(static.sequences, dynamic.sequences)
    for got, want in zip(static.logits, dynamic.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, options", [("fastv", {"layer": 2}), ("transition", {})])
def test_in_llm_methods_with_a_static_cache_generate_what_the_dynamic_cache_does(family, method, options):
    """In-LLM pruning leaves each layer's cache a different length; a static cache gives every
    layer the same slots, so the layers past a pruning stage get masks padded to all of them."""
    model, processor = BUILD[family](text_layers=4)
    inputs = two_prompts(family, processor)
    with vlm_prune.pruned(model, method, 0.25, **options) as handle:
        dynamic = _generate(model, inputs, do_sample=False)
        static = _generate(model, inputs, do_sample=False, cache_implementation="static")
        assert handle.layer_lengths[-1] < handle.layer_lengths[0]
    assert torch.equal(static.sequences, dynamic.sequences)
    for got, want in zip(static.logits, dynamic.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method, options", [("cls_attention", {}), ("fastv", {"layer": 2})])
def test_a_compiled_static_cache_decode_generates_what_the_dynamic_cache_does(method, options):
    """On a GPU, generate() with a static cache compiles the decode forward (torch.compile,
    hooks included). Forced here on the CPU (inductor): the same tokens and logits as the
    uncompiled dynamic cache, also for a second prompt whose images keep other tokens (nothing
    of the first prompt's pruning is baked into the compiled graph). Vision-stage methods: one
    graph for every decode step of both prompts (fullgraph, static shapes, no recompilation, as
    transformers' own compile tests demand); in-LLM methods slice each stage's mask with the
    cache's length, so their decode forward breaks the graph (documented)."""
    from transformers import CompileConfig

    model, processor = BUILD["llava"](text_layers=4)
    vision_stage = method == "cls_attention"
    compile_config = CompileConfig(fullgraph=True, dynamic=False) if vision_stage else CompileConfig()
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only by default
    first = two_prompts("llava", processor)
    second = dict(first, pixel_values=first["pixel_values"].flip(-1))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with vlm_prune.pruned(model, method, 0.25, **options) as handle:
        for inputs in (first, second):
            dynamic = _generate(model, inputs, do_sample=False)
            kept = handle.kept_indices
            compiled = _generate(model, inputs, do_sample=False, cache_implementation="static",
                                 compile_config=compile_config)
            assert all(torch.equal(a, b) for a, b in zip(handle.kept_indices, kept))
            assert hasattr(model, "_compiled_call")  # generate() did compile the decode forward
            assert torch.equal(compiled.sequences, dynamic.sequences)
            for got, want in zip(compiled.logits, dynamic.logits):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if vision_stage:  # every decode step of both prompts ran the one graph compiled first
        assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]


def _second_turn(processor, inputs, first, with_token_types):
    """The whole conversation after `first` (a generate() output): its sequences + a new
    question, with the mask (and Qwen's token types, when asked) extended to match."""
    question = processor.tokenizer([" And the colour?"] * first.sequences.shape[0], return_tensors="pt",
                                   add_special_tokens=False).input_ids
    ids = torch.cat([first.sequences, question], 1)
    extra = ids.shape[1] - inputs["input_ids"].shape[1]
    turn = {"input_ids": ids,
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(ids.shape[0], extra, dtype=torch.long)], 1)}
    if with_token_types and "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        turn["mm_token_type_ids"] = torch.cat([types, types.new_zeros(ids.shape[0], extra)], 1)
    return turn


def test_a_second_turn_continues_the_pruned_cache(family_model):
    """Chat with a reused cache: generate() is given the whole conversation (or only the new
    tokens, with the mask of the whole) and the first turn's cache, and cuts the conversation
    at the cache's (pruned) length. The next token's logits must equal a fresh pruned prefill
    of the whole conversation (cls_attention scores the image alone, so it keeps the same
    tokens): one row (generate() drops its all-ones mask) and a padded batch of two; on Qwen
    also with the token types."""
    family, model, batch = family_model
    _, processor = BUILD[family]()
    no_image = dict(do_sample=False, suppress_tokens=[model.config.image_token_id])
    one_row = {k: v[:1] if k != "pixel_values" or "image_grid_thw" not in batch else None for k, v in batch.items()}
    if "image_grid_thw" in batch:  # Qwen's patches of both images are one tensor
        one_row["pixel_values"] = batch["pixel_values"][: int(batch["image_grid_thw"][0].prod())]
    variants = [("whole", False), ("new only", False)] + [("whole", True)] * ("mm_token_type_ids" in batch)
    for inputs in (one_row, batch):
        for given, with_token_types in variants:
            with vlm_prune.pruned(model, "cls_attention", 0.5) as handle:
                first = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True,
                                       **no_image)
                kept = [s["kept"] for s in handle.stats]
                cache = first.cache
                cached = cache.get_seq_length()
                turn = _second_turn(processor, inputs, first, with_token_types)
                new = turn["input_ids"].shape[1] - first.sequences.shape[1] + 1  # the last answer token, the question
                if given == "new only":
                    turn["input_ids"] = turn["input_ids"][:, -new:]
                second = _generate(model, turn, cache=cache, **no_image)
                assert cache.get_seq_length() == cached + new + 3  # grew by the unseen tokens only
                fresh = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
                fresh.update(_second_turn(processor, inputs, first, with_token_types=True))
                with torch.no_grad():
                    want = model(**fresh).logits[:, -1]
                assert [s["kept"] for s in handle.stats] == kept
                assert all(s["kept"] < s["visual_tokens"] for s in handle.stats)
            torch.testing.assert_close(second.logits[0], want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{given}: {m}")


@pytest.mark.parametrize("method, options", [("cls_attention", {}), ("fastv", {"layer": 2})])
def test_each_cache_decodes_with_the_pruning_of_the_prompt_that_filled_it(method, options):
    """Two conversations in turns: a decode step on the first prompt's cache, taken after the
    second prompt's prefill, equals the same step taken before it; a cache filled while the
    model was unpatched decodes as the unpatched model does."""
    model, processor = BUILD["llava"](text_layers=4)
    first, second = (processor(images=[tiny.random_image(64, 48, seed=seed)], text=[text], return_tensors="pt")
                     for seed, text in [(0, "USER: <image>\nWhat is it? ASSISTANT:"),
                                        (1, "USER: <image>\nHow many green triangles are there? ASSISTANT:")])

    def decode(cache):  # one new token on a copy of the cache (a copy carries the pruning too)
        return model(input_ids=torch.tensor([[7]]), cache=copy.deepcopy(cache)).logits[0, -1]

    with torch.no_grad():
        unpatched = model(**first).cache
        want_unpatched = decode(unpatched)
        with vlm_prune.pruned(model, method, 0.25, **options) as handle:
            pruned = model(**first).cache
            want = decode(pruned)
            model(**second)
            assert handle.stats[0]["kept"] < handle.stats[0]["visual_tokens"]
            got, got_unpatched = decode(pruned), decode(unpatched)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_unpatched, want_unpatched, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, options", [("cls_attention", {"positions": "original"}), ("fastv", {"layer": 2})])
def test_a_failed_prefill_leaves_other_caches_tagged(method, options):
    """A prefill that raises (a prompt whose placeholders do not match its images) must not
    leave its cache tag behind for the next forward: two decode steps on another pruned cache
    after it equal the same two steps without the failure (a padded batch, whose mask each
    engine compacts its own way)."""
    model, processor = BUILD["llava"](text_layers=4)
    inputs = two_prompts("llava", processor)
    broken = dict(inputs, input_ids=inputs["input_ids"].clone())
    broken["input_ids"][0, broken["input_ids"][0].tolist().index(model.config.image_token_id)] = 7

    def two_steps(cache):
        return [model(input_ids=torch.full((2, 1), token),
                      attention_mask=torch.cat([inputs["attention_mask"], torch.ones(2, step, dtype=torch.long)], 1),
                      cache=cache).logits[:, -1] for step, token in ((1, 7), (2, 9))]

    with torch.no_grad(), vlm_prune.pruned(model, method, 0.25, **options):
        want = two_steps(copy.deepcopy(model(**inputs).cache))
        cache = model(**inputs).cache
        with pytest.raises((ValueError, RuntimeError)):
            model(**broken)
        got = two_steps(cache)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_cache_pruned_under_another_configuration_is_refused():
    """A cache carries the layout its prefill left (which tokens each layer holds): decoding it
    under a patch of another engine or schedule would misread it, so it is a clear error."""
    model, processor = BUILD["llava"](text_layers=4)
    inputs = two_prompts("llava", processor)
    step = {"input_ids": torch.tensor([[7], [7]]), "attention_mask": torch.ones(2, inputs["input_ids"].shape[1] + 1,
                                                                                dtype=torch.long)}
    for first, then in [(("cls_attention", {}), ("fastv", {"layer": 2})),
                        (("fastv", {"layer": 2}), ("cls_attention", {})),
                        (("fastv", {"layer": 2}), ("fastv", {"layer": 1}))]:
        with torch.no_grad():
            with vlm_prune.pruned(model, first[0], 0.25, **first[1]):
                cache = model(**inputs).cache
            with vlm_prune.pruned(model, then[0], 0.25, **then[1]):
                with pytest.raises(ValueError, match="another configuration"):
                    model(**step, cache=copy.deepcopy(cache))
            with vlm_prune.pruned(model, first[0], 0.5, **first[1]):  # the same layout, another keep
                assert model(**step, cache=cache).logits.shape[:2] == (2, 1)


def test_a_second_turn_on_an_in_llm_pruned_cache_and_misuse():
    """fastv keeps layer 0's cache whole, so generate() cuts the conversation where the
    unpruned model would: the new turn in one forward equals feeding it token by token. Giving
    generate() fewer tokens than the cache holds, or a pruned static cache, is a clear error."""
    model, processor = BUILD["llava"](text_layers=4)
    inputs = two_prompts("llava", processor)
    no_image = dict(do_sample=False, suppress_tokens=[model.config.image_token_id])
    with vlm_prune.pruned(model, "fastv", 0.25, layer=2):
        first = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True, **no_image)
        turn = _second_turn(processor, inputs, first, with_token_types=False)
        step_by_step = copy.deepcopy(first.cache)
        second = _generate(model, turn, cache=first.cache, **no_image)
        with torch.no_grad():
            for j in range(first.sequences.shape[1] - 1, turn["input_ids"].shape[1]):
                mask = turn["attention_mask"][:, :j + 1]  # positions as generate() numbers left-padded rows
                out = model(input_ids=turn["input_ids"][:, j:j + 1], attention_mask=mask,
                            position_ids=mask.cumsum(-1)[:, -1:] - 1, cache=step_by_step)
        torch.testing.assert_close(second.logits[0], out.logits[:, -1], rtol=1e-5, atol=1e-5)
    with vlm_prune.pruned(model, "cls_attention", 0.25):
        first = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, **no_image)
        with pytest.raises(ValueError, match="already holds"):
            _generate(model, inputs, cache=first.cache, **no_image)  # the first prompt again
        static = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True,
                                cache_implementation="static", **no_image)
        turn = _second_turn(processor, inputs, static, with_token_types=False)
        with pytest.raises(NotImplementedError, match="static cache"):
            _generate(model, turn, cache=static.cache, **no_image)


@pytest.mark.parametrize("method, options", [("cls_attention", {}), ("fastv", {"layer": 2})])
def test_chunked_prefill_is_refused_with_images_only(method, options):
    """generate(prefill_chunk_size=...) runs the prompt in pieces, none holding a whole image:
    a clear error (it was a confusing one, or silently no pruning) -- a text-only prompt and
    the unpatched model still chunk."""
    model, processor = BUILD["llava"](text_layers=4)
    inputs = two_prompts("llava", processor)
    text_only = processor.tokenizer(["USER: Hello there, how are you? ASSISTANT:"], return_tensors="pt")
    with vlm_prune.pruned(model, method, 0.25, **options):
        with pytest.raises(NotImplementedError, match="prefill_chunk_size=16"):
            _generate(model, inputs, do_sample=False, prefill_chunk_size=16)
        chunked = _generate(model, text_only, do_sample=False, prefill_chunk_size=4)
        whole = _generate(model, text_only, do_sample=False)
    assert torch.equal(chunked.sequences, whole.sequences)
    assert _generate(model, inputs, do_sample=False, prefill_chunk_size=16).sequences.shape[0] == 2


@pytest.mark.parametrize("method, options", [("fastv", {"layer": 2}), ("transition", {}),
                                             ("text_recovery", {}), ("cls_attention", {})])
def test_assisted_decoding_generates_what_greedy_does(method, options):
    """assistant_model= appends the draft's first candidates to the prompt's forward; a method
    that reads the instruction or the last prompt token must not read them (fastv's last row
    was a candidate's), so assisted decoding stays equal to greedy decoding."""
    model, processor = BUILD["llava"](text_layers=4)
    draft, _ = BUILD["llava"](text_layers=4, seed=1)
    # several candidates in the prompt's forward, whatever the (random) draft's confidence
    draft.generation_config.num_assistant_tokens = 4
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    batch = two_prompts("llava", processor)
    inputs = {k: v[1:] for k, v in batch.items()}  # assisted decoding takes one row
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                    return_dict_in_generate=True)
    with vlm_prune.pruned(model, method, 0.25, **options) as handle, torch.no_grad():
        greedy = model.generate(**inputs, **settings)
        kept = handle.kept_indices
        assisted = model.generate(**inputs, assistant_model=draft, **settings)
        assert all(torch.equal(a, b) for a, b in zip(handle.kept_indices, kept))
        assert handle.layer_lengths[-1] < handle.layer_lengths[0] or method in ("text_recovery", "cls_attention")
    assert torch.equal(assisted.sequences, greedy.sequences)
    torch.testing.assert_close(assisted.logits[0], greedy.logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, method, options", [("llava", "cls_attention", {}), ("llava", "fastv", {"layer": 2}),
                                                     ("qwen2_vl", "cls_attention", {}), ("llava_next", "visionzip", {})])
def test_generate_from_several_threads_equals_one_at_a_time(family, method, options):
    """Each generate() call has its own state (per call and per thread, no lock): generate()
    calls on one patched model from two threads at once each give what they give alone (with
    shared state they interleave and fail or mix the prompts' decisions; with the tower's
    signal hooks seen by both threads, one scores with the other's tensors)."""
    import threading

    model, processor = BUILD[family](text_layers=4)
    asked = [(0, (64, 48), "What is it?"), (1, (48, 80), "How many green triangles are there in the picture?")]
    if family == "llava":
        prompts = [processor(images=[tiny.random_image(*size, seed=seed)], text=[f"USER: <image>\n{q} ASSISTANT:"],
                             return_tensors="pt") for seed, size, q in asked]
    else:
        prompts = [make_inputs(processor, family, [size], [q], seeds=[seed]) for seed, size, q in asked]
    with torch.no_grad(), vlm_prune.pruned(model, method, 0.25, **options):
        alone = [model.generate(**p, max_new_tokens=12, min_new_tokens=12, do_sample=False) for p in prompts]
        start, outcomes = threading.Barrier(2), [[], []]

        def run(i):
            start.wait()
            for _ in range(4):
                try:
                    with torch.no_grad():
                        out = model.generate(**prompts[i], max_new_tokens=12, min_new_tokens=12, do_sample=False)
                    outcomes[i].append(torch.equal(out, alone[i]))
                except Exception as exc:  # noqa: BLE001 -- a thread's error must reach the assertion
                    outcomes[i].append(repr(exc))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert outcomes == [[True] * 4, [True] * 4]
