"""The Hugging Face transformers backend: greedy `generate` on a batch, left padded, with
vlm_prune patched in for the configuration, and the per-batch measurements of `Prediction`.

Timing (hooks, so the model code is untouched): the batch starts when the processor is called;
`prefill_s` runs from the first vision-tower or model forward call (transformers' generate
encodes images before the first forward) to the end of the first model forward, whose logits
give the first token; `ttft_s` adds the processor; decoding is the rest of `generate`.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

import vlm_prune
from vlm_prune.flops import prefill_flops

from .backend import Backend, Prediction, Request
from .hf_loading import load_local, prompt_for


class _Clock:
    """Forward hooks that stamp the first compute call and the end of the first model forward."""

    def __init__(self, model):
        self.start = self.first_token = None
        inner = getattr(model, "model", model)
        vision = getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)
        self._hooks = [model.register_forward_pre_hook(self._begin), model.register_forward_hook(self._end)]
        if vision is not None:
            self._hooks.append(vision.register_forward_pre_hook(self._begin))

    def _begin(self, *_):
        if self.start is None:
            self.start = time.perf_counter()

    def _end(self, *_):
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def remove(self):
        for h in self._hooks:
            h.remove()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model_dir: str, device: str = "auto", dtype: str = "auto"):
        self.model_dir = str(Path(model_dir).resolve())  # setup.json compares it on resume
        self.model, self.processor, self.family = load_local(model_dir, device, dtype)
        self.device = next(self.model.parameters()).device
        self.handle = None
        cfg = self.model.config
        self.image_token_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = self.model.generation_config.eos_token_id
        eos = tok.eos_token_id if eos is None else eos
        self.eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model_dir, "model_type": self.family,
                "device": str(self.device), "dtype": str(next(self.model.parameters()).dtype).replace("torch.", "")}

    def configure(self, method: str, keep, options: dict) -> None:
        vlm_prune.unpatch(self.model)
        self.handle = None if method == "none" else vlm_prune.patch(self.model, method, keep, **options)

    def close(self) -> None:
        vlm_prune.unpatch(self.model)

    def _token_counts(self, inputs, n: int) -> tuple[list[int], list[int], list[int] | None]:
        """Per row: visual tokens in, kept, and the extra tokens per layer (in-LLM pruning)."""
        ids = inputs["input_ids"]
        visual = (ids == self.image_token_id).sum(1).tolist() if self.image_token_id is not None else [0] * n
        if self.handle is None:
            return visual, visual, None
        stats = self.handle.stats
        if len(stats) == n:  # one entry per row (one image per prompt)
            visual, kept = [s["visual_tokens"] for s in stats], [s["kept"] for s in stats]
        else:
            kept = visual
        lengths = self.handle.layer_lengths
        return visual, kept, [L - lengths[-1] for L in lengths] if lengths else None

    def generate(self, batch: list[Request]) -> list[Prediction]:
        n = len(batch)
        t0 = time.perf_counter()
        texts = [prompt_for(self.processor, self.family, r.text) for r in batch]
        inputs = self.processor(images=[r.image for r in batch], text=texts, return_tensors="pt", padding=True)
        dtype = next(self.model.parameters()).dtype  # pixel values come as float32
        inputs = {k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        clock = _Clock(self.model)
        try:
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=max(r.max_new_tokens for r in batch),
                                          do_sample=False, pad_token_id=self.pad_id)
            _sync(self.device)
            t_end = time.perf_counter()
        finally:
            clock.remove()
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
        first = clock.first_token or t_end
        prefill = first - (clock.start or t0)
        visual, kept, extra = self._token_counts(inputs, n)
        real = inputs["attention_mask"].sum(1).tolist()
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        preds = []
        for i, r in enumerate(batch):
            tokens = new[i][: r.max_new_tokens]
            stop = next((j + 1 for j, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
            tokens = tokens[:stop]
            length = int(real[i]) - visual[i] + kept[i]  # this row's tokens after pruning
            lengths = [length + e for e in extra] if extra else length
            preds.append(Prediction(
                id=r.id, prediction=self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                visual_tokens=int(visual[i]), kept=int(kept[i]), prefill_s=prefill, ttft_s=first - t0,
                new_tokens=len(tokens), decode_s=t_end - first, peak_mem_bytes=int(peak),
                prefill_flops=prefill_flops(self.model.config.text_config, lengths).total, batch_size=n))
        return preds
