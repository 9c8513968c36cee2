"""`python -m vlm_prune.kernels.bench`: each Triton kernel against its reference, on a GPU.

Times at LLaVA-1.5 (576 tokens), LLaVA-NeXT (2880) and Qwen2-VL (16384) sizes -- reference and
Triton in --repeats interleaved rounds after 2 warm-up rounds, eager (CUDA events around one
call) and on the device (CUDA graph replays) -- then the end-to-end pruning overhead -- scoring
plus selection and compaction as a share of prefill -- for 7B-shaped LLaVA-1.5 and Qwen2-VL
(real vision towers; the LLM measured on a few decoder layers and scaled to its real depth),
with backend="torch" and "triton", and "triton" with every launch through Triton's own launcher
instead of `launch.launch`'s cache. Every timing goes through `vlm_prune.benchmark` (the harness
of all the benches). Prints Markdown tables; the numbers (JSON) and the printed tables with the
harness's per-variant spread (.txt) go to --out (default bench-results/), --json FILE also
writes the numbers there, --profile FILE torch.profiler op tables of one pruned prefill.

`--smoke` runs tiny sizes on CPU through the Triton interpreter (set TRITON_INTERPRET=1 before
starting Python) to check the script itself; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

SIZES = {"llava-1.5": 576, "llava-next": 2880, "qwen2-vl": 16384}


def _timing(device: str) -> str:
    """CUDA events on a GPU (host launch cost included, as a user sees it), the host clock on CPU."""
    return "cuda_events" if device == "cuda" else "host"


def _compare(device: str, repeats: int, ref, fused, graph: bool = False, on_error=None):
    """Reference and Triton in `repeats` interleaved rounds after 2 warm-up rounds
    (`vlm_prune.benchmark`); graph: each call captured 20 times in a CUDA graph, replays timed
    (the kernels' own device time, without the host's launch cost)."""
    from vlm_prune.benchmark import Variant, measure

    return measure([Variant("reference", ref), Variant("triton", fused)], rounds=repeats, warmup_rounds=2,
                   timing="cuda_graph" if graph else _timing(device), graph_calls=20, on_error=on_error)


def kernel_rows(device: str, repeats: int, sizes: dict[str, int], dtype: torch.dtype) -> list[dict]:
    from . import (cls_attention_scores_ref, top_k_in_order_ref, transition_variation_ref, triton_attention,
                   triton_compaction, triton_kernels)
    from .attention_received import attention_received_rotary_ref
    from .compaction import compact_prompt_ref

    rows = []
    for name, tokens in sizes.items():
        heads, head_dim = (16, 64) if name != "qwen2-vl" else (16, 80)
        q = torch.randn(1, heads, head_dim, device=device, dtype=dtype)
        k = torch.randn(1, heads, tokens + 1, head_dim, device=device, dtype=dtype)
        scores = torch.randn(1, tokens, device=device)
        feats = torch.randn(1, tokens, 4096, device=device, dtype=dtype)
        keep = max(1, tokens // 9)
        t_in = torch.randn(1, tokens + 64, 4096, device=device, dtype=dtype)
        t_out = torch.randn_like(t_in)
        visual = torch.zeros(1, tokens + 64, dtype=torch.bool, device=device)
        visual[:, :tokens] = True

        def topk_ref():
            index = top_k_in_order_ref(scores, keep)
            return feats.gather(1, index[..., None].expand(-1, -1, feats.shape[-1]))

        def topk_fused():
            return triton_kernels.compact_gather(feats, triton_kernels.topk_slots(scores, keep), keep)[0]

        # a prefill's compaction: the image's placeholders plus 64 text tokens, a 4096-wide table
        vocab = 32000 if device == "cuda" else 100
        table = torch.nn.Embedding(vocab, 4096, device=device, dtype=dtype)
        ids = torch.randint(0, vocab, (1, tokens + 64), device=device)
        is_image = torch.zeros_like(ids, dtype=torch.bool)
        is_image[:, 5:5 + tokens] = True
        kept_visual = torch.zeros(tokens, dtype=torch.bool, device=device)
        kept_visual[torch.randperm(tokens, device=device)[:keep]] = True
        kept_feats = torch.randn(keep, 4096, device=device, dtype=dtype)
        prompt_mask = torch.ones_like(ids)
        compact_args = (is_image, kept_visual, kept_feats, [64 + keep], True)
        compact_kw = dict(input_ids=ids, mask=prompt_mask, want_mask=True, renumber=True,
                          features_per_placeholder=False)

        def compact_ref():
            return compact_prompt_ref(*compact_args, table, **compact_kw).embeds

        def compact_fused():
            return triton_compaction.compact_prompt(*compact_args, table=table.weight, inputs_embeds=None, pad_id=0,
                                                    positions=None, **compact_kw)[4]

        # Qwen's [CLS]-free score: the last vision block's q, k (a view of its qkv), one segment
        qkv = torch.randn(tokens, 3, 16, 80, device=device, dtype=dtype)
        angles = torch.rand(tokens, 40, device=device) * 6
        angles = torch.cat([angles, angles], dim=-1)
        received_args = (qkv[:, 0], qkv[:, 1], angles.cos(), angles.sin(), 80**-0.5,
                         torch.tensor([0, tokens], dtype=torch.int32, device=device), 4)

        cases = [
            ("[CLS] attention row", lambda: cls_attention_scores_ref(q, k, head_dim**-0.5),
             lambda: triton_kernels.cls_attention_scores(q, k, head_dim**-0.5)),
            (f"top-{keep} + gather (D=4096)", topk_ref, topk_fused),
            ("TTV (D=4096)", lambda: transition_variation_ref(t_in, t_out, visual),
             lambda: triton_kernels.transition_variation(t_in, t_out, visual, "signed")),
            (f"prefill compaction, keep {keep} (D=4096)", compact_ref, compact_fused),
            ("attention received + rotary (16 heads x 80)", lambda: attention_received_rotary_ref(*received_args),
             lambda: triton_attention.attention_received_rotary(*received_args)),
        ]
        for op, ref, fused in cases:
            try:
                expected, got = ref().float(), fused().float()
                error = ((got - expected).norm() / expected.norm().clamp(min=1e-30)).item()
                eager = _compare(device, repeats, ref, fused)
                ref_ms, fused_ms = eager.ms("reference"), eager.ms("triton")
            except Exception as exc:  # one failing kernel must not hide the other rows
                print(f"[bench] {name} / {op}: {exc!r}", file=sys.stderr)
                continue
            row = dict(size=name, tokens=tokens, op=op, reference_ms=ref_ms, triton_ms=fused_ms,
                       speedup=ref_ms / fused_ms, relative_error=error,
                       reference_graph_ms=None, triton_graph_ms=None, graph_speedup=None,
                       timings={"eager": eager.to_dict()})
            if device == "cuda":
                # a reference that reads the device (a boolean index) cannot be captured: the other still runs
                def not_captured(variant, exc, name=name, op=op):
                    first = str(exc).splitlines()[0] if str(exc) else ""
                    print(f"[bench] {name} / {op}: {variant.name}_graph_ms not measured, the call cannot be captured "
                          f"in a CUDA graph ({type(exc).__name__}: {first})", file=sys.stderr)

                graph = _compare(device, repeats, ref, fused, graph=True, on_error=not_captured)
                for variant in ("reference", "triton"):
                    if not graph.failed(variant):
                        row[f"{variant}_graph_ms"] = graph.ms(variant)
                if row["reference_graph_ms"] and row["triton_graph_ms"]:
                    row["graph_speedup"] = row["reference_graph_ms"] / row["triton_graph_ms"]
                row["timings"]["graph"] = graph.to_dict()
            rows.append(row)
    return rows


# 7B-shaped models: the real vision towers, the LLM cut to a few decoder layers (enough to time
# the per-layer cost, which is then scaled to the real depth).
SHAPES_7B = {
    "llava-1.5-7b": dict(
        depth=32, build="llava", batches=(1, 8),
        sizes=dict(image_size=336, vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096,
                   text_hidden=4096, text_layers=4, text_heads=32, text_kv_heads=32, text_intermediate=11008)),
    "qwen2-vl-7b": dict(
        depth=28, build="qwen2_vl", batches=(1, 4),
        sizes=dict(vision_depth=32, vision_hidden=1280, vision_heads=16, vision_intermediate=5120, text_hidden=3584,
                   text_layers=4, text_heads=28, text_kv_heads=4, text_intermediate=18944, max_pixels=12845056)),
}
SMOKE_SHAPES = {
    "llava-smoke": dict(depth=4, build="llava", batches=(1, 2), sizes=dict(image_size=336, vision_hidden=64, vision_layers=2,
                                                             text_hidden=128, text_layers=2)),
    "qwen2-vl-smoke": dict(depth=4, build="qwen2_vl", batches=(1,), sizes=dict(vision_depth=2, vision_hidden=64, text_hidden=128,
                                                                 text_layers=2, max_pixels=64 * 28 * 28)),
}


def _model(shape: dict, device: str, dtype: torch.dtype):
    from vlm_prune import tiny

    with torch.device(device):  # initialise the weights where they run: seconds, not minutes, at 7B widths
        build = tiny.llava if shape["build"] == "llava" else tiny.qwen2_vl
        return build(dtype=dtype, **shape["sizes"])


def _inputs(shape: dict, processor, device: str, dtype: torch.dtype, batch: int = 1) -> dict:
    """`batch` different 640x480 images, one per prompt."""
    from vlm_prune import tiny

    if shape["build"] == "llava":
        prompt = "USER: <image>\nDescribe the picture. ASSISTANT:"
    else:
        prompt = tiny.qwen_prompt("Describe the picture.")
    images = [tiny.random_image(640, 480, seed=i) for i in range(batch)]
    inputs = processor(images=images, text=[prompt] * batch, return_tensors="pt")
    return {key: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for key, v in inputs.items()}


@contextlib.contextmanager
def _sync_timings(on: bool):
    """VLM_PRUNE_SYNC_TIMINGS for the block: exact stage timings (a device sync per reading) or
    an undisturbed pipeline."""
    previous = os.environ.get("VLM_PRUNE_SYNC_TIMINGS")
    os.environ["VLM_PRUNE_SYNC_TIMINGS"] = "1" if on else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["VLM_PRUNE_SYNC_TIMINGS"]
        else:
            os.environ["VLM_PRUNE_SYNC_TIMINGS"] = previous


def _language_model_inputs(model, prefill) -> dict:
    """The keyword arguments the language model receives in one prefill (cache objects left out,
    so a replay builds its own as the prefill did)."""
    seen: dict = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        prefill()
    finally:
        hook.remove()
    return {k: v for k, v in seen.items() if k not in ("cache", "past_key_values")}


# the backends, and the Triton backend with every launch through Triton's own launcher instead of
# `launch.launch`'s cache (what the cache saves, measured in the same rounds)
VARIANTS = ("torch", "triton", "triton uncached-launches")


def _launches(variant: str):
    if variant.endswith("uncached-launches"):
        from .launch import uncached

        return uncached()
    return contextlib.nullcontext()


def _models_own_positions(model, inputs: dict):
    """Qwen's M-RoPE position ids as the unpruned forward computes them (transformers'
    `get_rope_index`), as a callable; None for models without them. The pruned prefill computes
    its own instead (`positions_s`), so this is what its stretch replaces."""
    inner = model.model
    if not hasattr(inner, "get_rope_index") or "mm_token_type_ids" not in inputs:
        return None
    extra = {k: inputs[k] for k in ("image_grid_thw", "attention_mask") if k in inputs}

    def run():
        with torch.inference_mode():
            inner.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], **extra)
    return run


def overhead_rows(device: str, repeats: int, dtype: torch.dtype, smoke: bool, keep: float = 0.25,
                  rounds: int = 4, reports: list | None = None) -> list[dict]:
    """Per 7B shape, batch and backend, the pruning overhead, each against the prefill of the
    full-depth model (the LLM's measured per-layer cost times the real depth):

    - select_ms: scoring + selection + compaction on device-synchronised clocks (the handle's
      timings with VLM_PRUNE_SYNC_TIMINGS=1): exact, but every reading drains the pipeline;
    - select_host_ms: the same stretch on the host clock of an undisturbed prefill: the host time
      the pruning takes (all of it, where nothing in it waits for the device);
    - glue: an undisturbed prefill minus the vision tower alone minus the language model alone
      (on that prefill's inputs): the rest of the prefill -- embedding, the model's own merging of
      image features, and in the pruned prefill the pruning. e2e_overhead_ms is the pruned glue
      minus the unpruned glue (negative where the pruned path skips more of the model's merging
      than the pruning costs).

    A host-bound prefill drifts with the host's speed, so every variant is measured in `rounds`
    interleaved rounds (each reported number is a median over all of them). `reports` (a list)
    receives the harness's report of each model and batch.
    """
    import vlm_prune
    from vlm_prune.benchmark import Variant, measure

    per_round = max(2, repeats // rounds)
    rows = []
    for name, shape in (SMOKE_SHAPES if smoke else SHAPES_7B).items():
        try:
            model, processor = _model(shape, device, dtype)
        except Exception as exc:  # a bench row that fails must not hide the others
            print(f"[bench] {name}: could not build the model: {exc!r}", file=sys.stderr)
            continue
        n_layers = model.config.text_config.num_hidden_layers
        for batch in shape["batches"]:
            inputs = _inputs(shape, processor, device, dtype, batch)
            image_kw = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "image_sizes") if k in inputs}

            def prefill():
                with torch.inference_mode():
                    model(**inputs, logits_to_keep=1)

            def language_model_alone(kw):
                def run():
                    with torch.inference_mode():
                        hidden = model.model.language_model(**kw).last_hidden_state
                        model.lm_head(hidden[:, -1:])
                return run

            def vision_alone():
                with torch.inference_mode():
                    model.model.get_image_features(**image_kw)

            lm_unpruned = language_model_alone(_language_model_inputs(model, prefill))
            own_positions = _models_own_positions(model, inputs)
            calls = {"unpruned": _host_calls(prefill)}
            handles: dict = {}
            lm_pruned: dict = {}

            def pruned_block(backend: str, sync: bool, lm: bool = False):
                @contextlib.contextmanager
                def block():
                    with vlm_prune.pruned(model, "cls_attention", keep, backend=backend.split()[0]) as handle, \
                            _launches(backend), _sync_timings(sync):
                        handles[backend] = handle
                        if lm:  # the language model's inputs in this pruned prefill
                            lm_pruned[backend] = language_model_alone(_language_model_inputs(model, prefill))
                        yield
                return block

            def stages(backend: str):
                def read(_):
                    t = handles[backend].timings
                    return {"vision": t["vision_s"], "select": t["select_s"], "positions": t.get("positions_s", 0.0)}
                return read

            undisturbed = lambda: _sync_timings(False)  # noqa: E731
            variants = [Variant("prefill", prefill, around=undisturbed),
                        Variant("vision", vision_alone, around=undisturbed),
                        Variant("lm", lm_unpruned, around=undisturbed)]
            if own_positions is not None:
                variants.append(Variant("own positions", own_positions, around=undisturbed))
            for backend in VARIANTS:
                variants += [
                    Variant(f"{backend} sync", prefill, around=pruned_block(backend, True), extras=stages(backend),
                            group=backend),
                    Variant(f"{backend} host", prefill, around=pruned_block(backend, False), extras=stages(backend),
                            group=backend),
                    Variant(f"{backend} lm", lambda backend=backend: lm_pruned[backend](),
                            around=pruned_block(backend, False, lm=True), group=backend),
                ]

            def backend_failed(variant, exc):
                if variant.group is None:  # the unpruned baseline: nothing to compare against
                    raise exc
                print(f"[bench] {name} / batch {batch} / {variant.group}: {exc!r}", file=sys.stderr)

            measured = measure(variants, rounds=rounds, per_round=per_round, warmup_rounds=0, warmup_calls=1,
                               timing=_timing(device), on_error=backend_failed)
            if reports is not None:
                reports.append(dict(model=name, batch=batch, report=measured.to_dict()))
            failed = {v.group for v in variants if v.group is not None and measured.failed(v.name)}
            stats: dict = {}
            for backend in VARIANTS:
                if backend in failed:
                    continue
                try:
                    with vlm_prune.pruned(model, "cls_attention", keep, backend=backend.split()[0]) as handle, \
                            _launches(backend), _sync_timings(False):
                        calls[backend] = _host_calls(prefill)
                        stats[backend] = handle.stats[0]
                except Exception as exc:
                    failed.add(backend)
                    print(f"[bench] {name} / batch {batch} / {backend}: {exc!r}", file=sys.stderr)
            med = {"prefill": measured.ms("prefill"), "vision": measured.ms("vision"), "lm": measured.ms("lm")}
            if own_positions is not None:
                med["own_positions"] = measured.ms("own positions")
            for backend in set(VARIANTS) - failed:
                med[backend, "lm"] = measured.ms(f"{backend} lm")
                for sync, clock in ((True, "sync"), (False, "host")):
                    med[backend, sync] = measured.ms(f"{backend} {clock}")
                    for stage in ("vision", "select", "positions"):
                        med[backend, sync, stage] = measured.ms(f"{backend} {clock}", stage)
            unpruned_ms, vision_alone_ms, lm_unpruned_ms = med["prefill"], med["vision"], med["lm"]
            glue_unpruned = unpruned_ms - vision_alone_ms - lm_unpruned_ms
            for backend in VARIANTS:
                if backend in failed:
                    continue
                vision_ms, select_ms = med[backend, True, "vision"], med[backend, True, "select"]
                pruned_ms, pruned_e2e_ms, lm_pruned_ms = med[backend, True], med[backend, False], med[backend, "lm"]
                layer_full = (unpruned_ms - vision_ms) / n_layers
                layer_pruned = (pruned_ms - vision_ms - select_ms) / n_layers
                full_unpruned = vision_ms + shape["depth"] * layer_full
                full_pruned = vision_ms + shape["depth"] * layer_pruned + select_ms
                glue_pruned = pruned_e2e_ms - vision_alone_ms - lm_pruned_ms
                full_pruned_e2e = vision_alone_ms + shape["depth"] / n_layers * lm_pruned_ms + glue_pruned
                full_unpruned_e2e = vision_alone_ms + shape["depth"] / n_layers * lm_unpruned_ms + glue_unpruned
                rows.append(dict(
                    model=name, batch=batch, backend=backend,
                    tokens=f"{stats[backend]['visual_tokens']}->{stats[backend]['kept']}",
                    measured_layers=n_layers, depth=shape["depth"], samples=measured.stats(f"{backend} sync").n,
                    vision_ms=vision_ms, select_ms=select_ms, select_host_ms=med[backend, False, "select"],
                    positions_host_ms=med[backend, False, "positions"],
                    measured_unpruned_ms=unpruned_ms, measured_pruned_ms=pruned_ms,
                    prefill_unpruned_ms=full_unpruned, prefill_pruned_ms=full_pruned,
                    speedup=full_unpruned / full_pruned, overhead_pct=100 * select_ms / full_pruned,
                    overhead_of_unpruned_pct=100 * select_ms / full_unpruned,
                    vision_alone_ms=vision_alone_ms, lm_unpruned_ms=lm_unpruned_ms, lm_pruned_ms=lm_pruned_ms,
                    pruned_e2e_ms=pruned_e2e_ms, glue_unpruned_ms=glue_unpruned, glue_pruned_ms=glue_pruned,
                    e2e_overhead_ms=glue_pruned - glue_unpruned,
                    e2e_overhead_pct=100 * (glue_pruned - glue_unpruned) / full_pruned_e2e,
                    select_host_pct=100 * med[backend, False, "select"] / full_pruned_e2e,
                    # the stretch less the position ids the unpruned forward computes itself
                    positions_unpruned_ms=med.get("own_positions", 0.0),
                    select_host_net_pct=100 * (med[backend, False, "select"] - med.get("own_positions", 0.0))
                    / full_pruned_e2e,
                    prefill_unpruned_e2e_ms=full_unpruned_e2e, prefill_pruned_e2e_ms=full_pruned_e2e,
                    speedup_e2e=full_unpruned_e2e / full_pruned_e2e,
                    host_ops_unpruned=calls["unpruned"].ops, host_ops=calls[backend].ops,
                    launches=calls[backend].launches, reads_unpruned=calls["unpruned"].reads,
                    reads=calls[backend].reads,
                ))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _host_calls(prefill):
    """PyTorch ops, Triton launches and device reads of one prefill (`host_calls`)."""
    from .host_calls import count_host_calls

    with count_host_calls() as calls:
        prefill()
    return calls


def _python_profile(model, inputs: dict, backend: str, calls: int = 20) -> str:
    """cProfile of `calls` undisturbed pruned prefills, restricted to vlm_prune's own code and
    Triton's launcher: where the pruning's host time goes, line by line of Python."""
    import cProfile
    import io
    import pstats

    import vlm_prune

    profiler = cProfile.Profile()
    with vlm_prune.pruned(model, "cls_attention", 0.25, backend=backend), torch.inference_mode(), \
            _sync_timings(False):
        model(**inputs, logits_to_keep=1)
        profiler.enable()
        for _ in range(calls):
            model(**inputs, logits_to_keep=1)
        profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    out.write(f"---- Python profile, {calls} prefills, backend={backend}: by own time\n")
    stats.sort_stats("tottime").print_stats(r"main/(vlm_prune|patches|kernels)/|triton/runtime/jit", 30)
    out.write("---- by cumulative time\n")
    stats.sort_stats("cumtime").print_stats(r"main/(vlm_prune|patches|kernels)/|triton/runtime/jit", 30)
    return out.getvalue() + "\n"


def profile_selection(device: str, dtype: torch.dtype, path: str, smoke: bool) -> None:
    """One pruned prefill per shape and backend under torch.profiler; op tables (by device and by
    host time) go to the text file `path`, to show what the selection path spends its time on."""
    import vlm_prune
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for name, shape in (SMOKE_SHAPES if smoke else SHAPES_7B).items():
        try:
            model, processor = _model(shape, device, dtype)
            inputs = _inputs(shape, processor, device, dtype)
            for backend in ("torch", "triton"):
                with vlm_prune.pruned(model, "cls_attention", 0.25, backend=backend), torch.inference_mode():
                    for _ in range(2):
                        model(**inputs, logits_to_keep=1)
                    with profile(activities=activities) as prof:
                        model(**inputs, logits_to_keep=1)
                sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
                with open(path, "a") as f:
                    table = prof.key_averages()
                    f.write(f"==== {name}, backend={backend}\n")
                    f.write(table.table(sort_by=sort, row_limit=40) + "\n\n")
                    f.write(table.table(sort_by="cpu_time_total", row_limit=40) + "\n\n")
                    f.write(_python_profile(model, inputs, backend))
            del model
        except Exception as exc:
            print(f"[bench] profile {name}: {exc!r}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU via the Triton interpreter")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--out", default="bench-results",
                        help="folder for this run's numbers (JSON) and its printed tables (.txt) ('' for none)")
    parser.add_argument("--profile", metavar="FILE", help="also write torch.profiler op tables of a pruned prefill here")
    args = parser.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 2
        device, dtype, sizes, repeats = "cpu", torch.float32, {"smoke": 64}, 1
    else:
        if not torch.cuda.is_available():
            print("the kernel bench needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
            return 2
        device, dtype, sizes, repeats = "cuda", getattr(torch, args.dtype), SIZES, args.repeats
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter)"

    from vlm_prune.benchmark import RunLog, describe, report_table

    log = RunLog(args.out or None, f"kernels-{name}-{args.dtype if device == 'cuda' else 'smoke'}", json_path=args.json)

    def save(**parts):  # after each section, so a run cut short still leaves its numbers
        log.save({"device": name, **parts})

    kernels = kernel_rows(device, repeats, sizes, dtype)
    save(kernels=kernels)
    log.print(f"vlm_prune kernels on {name}, {args.dtype if device == 'cuda' else 'float32'}, median of {repeats}\n")
    log.print("Eager: one call timed with events around it (host launch cost included). Device: calls "
              "replayed from a CUDA graph (the kernels' own time).\n")
    log.print("| size | tokens | op | eager reference ms | eager Triton ms | eager speed-up | device reference ms "
              "| device Triton ms | device speed-up | rel. error |\n|---|---|---|---|---|---|---|---|---|---|")

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in kernels:
        log.print(f"| {r['size']} | {r['tokens']} | {r['op']} | {r['reference_ms']:.3f} | {r['triton_ms']:.3f} | "
                  f"{r['speedup']:.2f}x | {fmt(r['reference_graph_ms'], '.4f')} | {fmt(r['triton_graph_ms'], '.4f')} | "
                  f"{fmt(r['graph_speedup'], '.2f')}x | {r['relative_error']:.1e} |")
    overhead_timings: list[dict] = []
    overhead = overhead_rows(device, max(4, repeats // 2), dtype, args.smoke, rounds=1 if args.smoke else 4,
                             reports=overhead_timings)
    save(kernels=kernels, overhead=overhead, overhead_timings=overhead_timings)
    log.print("\nPruning overhead, cls_attention keep 0.25, 640x480 image: LLM per-layer cost measured on the "
              "first layers and scaled to the real depth; device-synchronised timings\n")
    log.print("| model | batch | backend | visual tokens per image | vision ms | scoring + compaction ms "
              "| measured (4 layers) unpruned -> pruned ms | full depth unpruned -> pruned ms | speed-up "
              "| overhead (share of pruned prefill) |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in overhead:
        log.print(f"| {r['model']} | {r['batch']} | {r['backend']} | {r['tokens']} | {r['vision_ms']:.2f} | "
                  f"{r['select_ms']:.3f} | {r['measured_unpruned_ms']:.2f} -> {r['measured_pruned_ms']:.2f} | "
                  f"{r['prefill_unpruned_ms']:.2f} -> {r['prefill_pruned_ms']:.2f} | {r['speedup']:.2f}x | "
                  f"{r['overhead_pct']:.2f}% |")
    log.print("\nThe same from undisturbed prefills (no synchronising clocks). Glue: prefill - vision tower alone - "
              "language model alone on that prefill's inputs; host: the pruning's own stretch on the host clock "
              "(it includes the model's own position ids -- Qwen's M-RoPE index -- which the unpruned forward "
              "computes too)\n")
    log.print("| model | batch | backend | vision alone ms | LLM alone unpruned -> pruned ms | prefill unpruned -> "
              "pruned ms | glue unpruned -> pruned ms | full depth unpruned -> pruned ms | pruning on the host ms "
              "(share) | of which position ids ms | the unpruned forward's own position ids ms | share net of "
              "those |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in overhead:
        log.print(f"| {r['model']} | {r['batch']} | {r['backend']} | {r['vision_alone_ms']:.2f} | "
                  f"{r['lm_unpruned_ms']:.2f} -> {r['lm_pruned_ms']:.2f} | {r['measured_unpruned_ms']:.2f} -> "
                  f"{r['pruned_e2e_ms']:.2f} | {r['glue_unpruned_ms']:.2f} -> {r['glue_pruned_ms']:.2f} | "
                  f"{r['prefill_unpruned_e2e_ms']:.2f} -> {r['prefill_pruned_e2e_ms']:.2f} | "
                  f"{r['select_host_ms']:.3f} ({r['select_host_pct']:.2f}%) | {r['positions_host_ms']:.3f} | "
                  f"{r['positions_unpruned_ms']:.3f} | {r['select_host_net_pct']:.2f}% |")
    log.print("\nHost calls of one prefill (counted, not timed): PyTorch ops that are not views, Triton launches, "
              "device reads\n")
    log.print("| model | batch | backend | ops unpruned -> pruned | Triton launches | device reads unpruned -> pruned |"
              "\n|---|---|---|---|---|---|")
    for r in overhead:
        log.print(f"| {r['model']} | {r['batch']} | {r['backend']} | {r['host_ops_unpruned']} -> {r['host_ops']} | "
                  f"{r['launches']} | {r['reads_unpruned']} -> {r['reads']} |")
    log.note("\nThe harness's samples (vlm_prune.benchmark): per kernel and per model and batch, n, median and "
             "spread\n")
    for r in kernels:
        for mode, report in r["timings"].items():
            log.note(f"{r['size']} / {r['op']} / {mode}: {describe(report['settings'])}")
            log.note(report_table(report, baseline="reference") + "\n")
    for t in overhead_timings:
        log.note(f"{t['model']} / batch {t['batch']}: {describe(t['report']['settings'])}")
        log.note(report_table(t["report"], baseline="prefill") + "\n")
    if args.profile:
        profile_selection(device, dtype, args.profile, args.smoke)
    if log.paths:
        print(f"wrote {', '.join(map(str, log.paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
