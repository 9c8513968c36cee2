"""The vLLM backend: the same requests through `vllm.LLM`, with vlm_prune's vLLM plugin.

A configuration is an engine argument (`hf_overrides={"vlm_prune": {...}}`), so each
configuration starts its own engine (20-40 s on CPU). vLLM must be importable: on GPU machines
`pip install vlm-prune[vllm]`; on the CPU machines run the harness with the interpreter of
.venv-vllm (scripts/setup_vllm_env.sh), e.g. `.venv-vllm/bin/python -m vlm_prune.evals.cli
--backend vllm ...`. Only vision-stage methods with a fixed budget run on vLLM (the plugin
refuses the others at engine start with the reason).

Measurements: vLLM schedules the batch itself, so latencies are of the whole batch: `ttft_s` is
the request-to-first-token time vLLM reports when it does (else the batch time), `prefill_s`
its prefill share, `decode_s` the rest. Visual tokens in come from the processor (what the
unpruned prompt holds), kept tokens from the prompt vLLM actually ran.
"""

from __future__ import annotations

import gc
import resource
import time
from pathlib import Path

from transformers import AutoConfig

from vlm_prune.flops import prefill_flops

from .backend import Backend, Prediction, Request
from .hf_loading import load_processor, prompt_for


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, model_dir: str, device: str = "auto", dtype: str = "auto", max_model_len: int | None = None):
        try:
            import vllm  # noqa: F401
        except ImportError as error:
            raise RuntimeError(
                "--backend vllm needs vLLM in this environment: `pip install vlm-prune[vllm]` (GPU), or "
                "run the harness with .venv-vllm/bin/python on CPU machines (scripts/setup_vllm_env.sh)"
            ) from error
        self.model_dir = str(Path(model_dir).resolve())
        self.config = AutoConfig.from_pretrained(self.model_dir)
        self.family = self.config.model_type
        self.processor = load_processor(self.model_dir, self.family)
        self.image_token_id = getattr(self.config, "image_token_id", None) or getattr(self.config, "image_token_index", None)
        self.dtype = "float32" if dtype == "auto" else dtype
        self.max_model_len = max_model_len
        self.llm = None
        self.current = None

    def describe(self) -> dict:
        import vllm

        return {"backend": self.name, "vllm": vllm.__version__, "model": self.model_dir,
                "model_type": self.family, "dtype": self.dtype}

    def configure(self, method: str, keep, options: dict) -> None:
        wanted = None if method == "none" else {"method": method, "keep": keep, **options}
        if self.llm is not None and wanted == self.current:
            return
        self.close()
        from vllm import LLM

        kwargs = dict(model=self.model_dir, dtype=self.dtype, seed=0)
        if self.max_model_len:  # else vLLM derives it from the checkpoint
            kwargs["max_model_len"] = self.max_model_len
        try:
            import torch

            if not torch.cuda.is_available():  # CPU: eager, and a small share of RAM for the KV cache
                kwargs.update(enforce_eager=True, gpu_memory_utilization=0.1)
        except ImportError:
            pass
        if wanted is not None:
            kwargs["hf_overrides"] = {"vlm_prune": wanted}
        self.llm = LLM(**kwargs)
        self.current = wanted

    def close(self) -> None:
        if self.llm is not None:
            del self.llm
            self.llm = None
            gc.collect()

    def generate(self, batch: list[Request]) -> list[Prediction]:
        from vllm import SamplingParams

        t0 = time.perf_counter()
        prompts = [prompt_for(self.processor, self.family, r.text) for r in batch]
        requests = [{"prompt": p, "multi_modal_data": {"image": r.image}} for p, r in zip(prompts, batch)]
        params = [SamplingParams(temperature=0, max_tokens=r.max_new_tokens) for r in batch]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        t_end = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        preds = []
        for request, prompt, out in zip(batch, prompts, outputs):
            unpruned = self.processor(images=[request.image], text=[prompt], return_tensors="pt")["input_ids"][0]
            visual = int((unpruned == self.image_token_id).sum())
            kept = sum(1 for t in out.prompt_token_ids if t == self.image_token_id)
            first = _first_token_latency(out)
            ttft = first if first is not None else t_end - t0
            preds.append(Prediction(
                id=request.id, prediction=out.outputs[0].text.strip(), visual_tokens=visual, kept=kept,
                prefill_s=ttft, ttft_s=ttft, new_tokens=len(out.outputs[0].token_ids),
                decode_s=max(0.0, (t_end - t0) - ttft), peak_mem_bytes=int(peak),
                prefill_flops=prefill_flops(self.config.text_config, len(out.prompt_token_ids)).total,
                batch_size=len(batch)))
        return preds


def _first_token_latency(output) -> float | None:
    metrics = getattr(output, "metrics", None)
    for name in ("first_token_latency", "time_to_first_token"):
        value = getattr(metrics, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None
