"""vLLM plugin: visual token pruning in a vLLM server with one flag.

    vllm serve ./llava-1.5-7b-hf \\
        --hf-overrides '{"vlm_prune": {"method": "cls_attention", "keep": 64}}'

`register()` is the `vllm.general_plugins` entry point; vLLM calls it in every process (API
server, engine core, workers), so it is idempotent and cheap: it only tells vLLM's model
registry which class implements each supported architecture, by name (nothing is imported).
The classes behave exactly like vLLM's own unless the model's HF config carries a `vlm_prune`
entry (from --hf-overrides) or the environment variable VLM_PRUNE holds the same JSON.
"""

from __future__ import annotations

_ARCHITECTURES = {
    "LlavaForConditionalGeneration": "vlm_prune.vllm_plugin.llava:PrunedLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "vlm_prune.vllm_plugin.llava_next:PrunedLlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "vlm_prune.vllm_plugin.qwen2_vl:PrunedQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "vlm_prune.vllm_plugin.qwen2_vl:PrunedQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "vlm_prune.vllm_plugin.qwen3_vl:PrunedQwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration": "vlm_prune.vllm_plugin.qwen3_vl:PrunedQwen3VLMoeForConditionalGeneration",
    "Qwen3_5ForConditionalGeneration": "vlm_prune.vllm_plugin.qwen3_5:PrunedQwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration": "vlm_prune.vllm_plugin.qwen3_5:PrunedQwen3_5MoeForConditionalGeneration",
}
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    for architecture, target in _ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
    _registered = True
