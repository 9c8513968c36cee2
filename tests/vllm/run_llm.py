"""Runs vLLM offline on a request file and prints the results as JSON (executed with the
.venv-vllm interpreter by tests/test_vllm.py; vLLM pins an older transformers than the main venv).

    python run_llm.py SPEC_JSON     # {"model", "requests": [{"prompt", "image": [w, h, seed]}
                                    #  or {"prompt", "images": [[w, h, seed], ...]}],
                                    #  "overrides": {...} | null, "max_tokens": n,
                                    #  "llm_kwargs": {...} (optional, more LLM(...) arguments),
                                    #  "logprobs": true (optional: each generated token's logprob),
                                    #  "env": {...} (optional, set before vLLM is imported, e.g.
                                    #  VLLM_CPU_OMP_THREADS_BIND="0|1" for two ranks)}

    With "runs": [{"overrides": ..., "llm_kwargs": ...}, ...] in the spec, one engine per run, one
    after another in this process (the imports are paid once; each engine is shut down before
    the next starts): prints "RESULT " + the list of each run's results, and "TIMINGS " + each
    engine's start-up seconds.
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

    requests = [{"prompt": r["prompt"], "multi_modal_data": {"image": images(r)}} for r in spec["requests"]]
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
