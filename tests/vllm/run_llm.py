"""Runs vLLM offline on a request file and prints the results as JSON (executed with the
.venv-vllm interpreter by tests/test_vllm.py; vLLM pins an older transformers than the main venv).

    python run_llm.py SPEC_JSON     # {"model", "requests": [{"prompt", "image": [w, h, seed]}
                                    #  or {"prompt", "images": [[w, h, seed], ...]}],
                                    #  "overrides": {...} | null, "max_tokens": n,
                                    #  "llm_kwargs": {...} (optional, more LLM(...) arguments),
                                    #  "logprobs": true (optional: each generated token's logprob),
                                    #  "env": {...} (optional, set before vLLM is imported, e.g.
                                    #  VLLM_CPU_OMP_THREADS_BIND="0|1" for two ranks)}

    A request may carry a video instead of (or beside) images: {"prompt", "video": [w, h, frames,
    seed], "fps": 2.0 (optional)}: frame i is tiny.random_image(w, h, seed + i), sent as
    (array [frames, h, w, 3], metadata) with frames_indices 0..frames-1 at `fps` (what Qwen3-VL's
    timestamps are computed from); the engine gets limit_mm_per_prompt {"video": 1}.

    With "runs": [{"overrides": ..., "llm_kwargs": ...}, ...] in the spec, one engine per run, one
    after another in this process (the imports are paid once; each engine is shut down before
    the next starts): prints "RESULT " + the list of each run's results, and "TIMINGS " + each
    engine's start-up seconds. A run may name its own "model" and "requests"; a run with
    "expect_error": true must fail to start (its result: {"error": the exception's text}; the
    engine core's own message goes to stderr): keep it last.
"""

import json
import os
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.update(spec.get("env") or {})  # seen by vLLM and by the workers it starts
    if "runs" not in spec:
        print("RESULT " + json.dumps(run(spec)[0]))
        return
    results, timings = [], []
    for one in spec["runs"]:
        if one.get("expect_error"):  # a start-up that must fail (keep such a run last): its message
            import time

            started = time.perf_counter()
            try:
                run({**spec, **one}, shut_down=True)
                results.append({"error": None})
            except Exception as error:  # noqa: BLE001 -- vLLM wraps the engine core's error
                results.append({"error": f"{type(error).__name__}: {error}"})
            timings.append(round(time.perf_counter() - started, 1))
            continue
        result, started = run({**spec, **one}, shut_down=True)
        results.append(result)
        timings.append(round(started, 1))
    print("TIMINGS " + json.dumps(timings))
    print("RESULT " + json.dumps(results))


def run(spec: dict, shut_down: bool = False) -> tuple[list, float]:
    """(the results of the spec's requests, the engine's start-up seconds)."""
    import time

    from vllm import LLM, SamplingParams

    from vlm_prune import tiny

    kwargs = dict(model=spec["model"], enforce_eager=True, max_model_len=1024, dtype="float32", seed=0,
                  gpu_memory_utilization=0.1)  # on CPU this is the share of RAM kept for the KV cache
    per_prompt = max(len(r.get("images", [None])) for r in spec["requests"])
    if per_prompt > 1:
        kwargs["limit_mm_per_prompt"] = {"image": per_prompt}
    if any("video" in r for r in spec["requests"]):
        kwargs["limit_mm_per_prompt"] = {**kwargs.get("limit_mm_per_prompt", {}), "video": 1}
    if spec.get("overrides"):
        kwargs["hf_overrides"] = spec["overrides"]
    kwargs.update(spec.get("llm_kwargs") or {})
    started = time.perf_counter()
    llm = LLM(**kwargs)
    started = time.perf_counter() - started
    def images(r):
        if "images" in r:
            return [tiny.random_image(*i) for i in r["images"]]
        return tiny.random_image(*r["image"])

    def media(r):
        data = {"image": images(r)} if "image" in r or "images" in r else {}
        if "video" in r:
            import numpy as np

            w, h, n, seed = r["video"]
            fps = r.get("fps", 2.0)
            frames = np.stack([np.asarray(tiny.random_image(w, h, seed=seed + i)) for i in range(n)])
            metadata = {"total_num_frames": n, "fps": fps, "width": w, "height": h, "duration": n / fps,
                        "frames_indices": list(range(n)), "video_backend": "opencv"}
            data["video"] = (frames, metadata)
        return data

    requests = [{"prompt": r["prompt"], "multi_modal_data": media(r)} for r in spec["requests"]]
    params = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 6),
                            logprobs=0 if spec.get("logprobs") else None)
    outputs = llm.generate(requests, params, use_tqdm=False)
    result = [{"tokens": list(o.outputs[0].token_ids), "prompt_tokens": len(o.prompt_token_ids)} for o in outputs]
    if spec.get("logprobs"):  # the sampled token's logprob at each step
        for r, o in zip(result, outputs):
            r["logprobs"] = [step[token].logprob for step, token in zip(o.outputs[0].logprobs, r["tokens"])]
    if shut_down:  # the engine core and its workers exit before the next engine starts
        llm.llm_engine.engine_core.shutdown()
    return result, started


if __name__ == "__main__":
    main()
