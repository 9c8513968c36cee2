"""The backend interface the runner talks to (the backends by name: backends.py).

    backend = make_backend("hf", "./llava-1.5-7b-hf", device="cuda")   # backends.make_backend
    backend.configure("cls_attention", 64, {})            # "none" = the unpruned baseline
    preds = backend.generate([Request(id="17", image=pil_image, text="What is it?\\n<suffix>",
                                      max_new_tokens=16)])  # -> [Prediction], same order

A backend owns the prompt template (the text is the question plus suffix; it adds the image
slot and the chat format), the batching and the measurements of `Prediction`. This module
imports no backend (hf_backend.py and vllm_backend.py import it), so it has no import cycle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Request:
    id: str
    image: Any  # PIL RGB image
    text: str  # question + "\n" + suffix, without image slot or chat template
    max_new_tokens: int


@dataclass
class Prediction:
    """One answer and what producing it cost. Latencies are of the batch it ran in (shared by
    its `batch_size` rows); FLOPs are this row's theoretical LLM prefill FLOPs."""

    id: str
    prediction: str
    visual_tokens: int  # visual tokens the model produced for the image
    kept: int  # visual tokens the LLM saw (== visual_tokens unpruned)
    prefill_s: float  # vision tower + pruning + LLM prefill (first forward) of the batch
    ttft_s: float  # preprocessing + prefill: request to first token of the batch
    new_tokens: int  # tokens generated for this row (up to and including EOS)
    decode_s: float  # first token to last of the batch
    peak_mem_bytes: int  # CUDA: max allocated during the batch; CPU: process max RSS so far
    prefill_flops: float
    batch_size: int

    def to_dict(self) -> dict:
        return asdict(self)


class Backend(ABC):
    name = "base"

    @abstractmethod
    def configure(self, method: str, keep: int | float, options: dict) -> None:
        """Prune with (method, keep, options) from now on; method "none" = unpruned."""

    @abstractmethod
    def generate(self, batch: list[Request]) -> list[Prediction]:
        """Greedy answers for a batch, in order."""

    def describe(self) -> dict:
        """What identifies the setup in result files (model, device, dtype...)."""
        return {"backend": self.name}

    def close(self) -> None:
        pass

