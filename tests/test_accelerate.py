"""Models dispatched by accelerate (`device_map=`, CPU / disk offload), as 7B checkpoints are often
loaded: a pruned offloaded model gives what the same model pruned in memory gives.

accelerate's hooks rebuild the containers of every forward's inputs (generate's pre-computed
image features arrive as a new object) and keep offloaded weights as meta tensors between calls
(the embedding table cannot be read directly). Here the execution device is the CPU, where the
hooks behave as on a GPU machine."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload, dispatch_model

import vlm_prune

from .test_families import BUILD, greedy, logits, two_prompts


def _offloaded(model, how, tmp_path):
    model = copy.deepcopy(model)
    if how == "cpu_offload":  # every weight offloaded, loaded per module call
        cpu_offload(model, execution_device=torch.device("cpu"))
    else:  # a device map, the language model on disk
        device_map = {f"model.{name}": "disk" if name == "language_model" else "cpu"
                      for name, _ in model.model.named_children()}
        device_map.update({f"model.{name}": "cpu" for name, _ in model.model.named_parameters(recurse=False)})
        dispatch_model(model, device_map={**device_map, "lm_head": "cpu"}, offload_dir=str(tmp_path))
    return model


@pytest.mark.filterwarnings("ignore:The following device_map keys")  # accelerate on a bare parameter
@pytest.mark.parametrize("family, method, backend, how", [
    ("llava", "cls_attention", "triton", "cpu_offload"),
    ("llava", "cls_attention", "torch", "device_map"),
    ("llava", "transition", "torch", "cpu_offload"),
    ("llava_next", "cls_attention", "triton", "device_map"),
    ("qwen2_vl", "cls_attention", "triton", "cpu_offload"),
    ("qwen2_5_vl", "dct", "torch", "device_map"),
])
def test_offloaded_model_prunes_like_the_model_in_memory(family, method, backend, how, tmp_path):
    model, processor = BUILD[family]()
    inputs = two_prompts(family, processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)  # a loss on every kept token
    with vlm_prune.pruned(model, method, 0.5, backend=backend) as handle, torch.no_grad():
        want_logits, want_tokens = logits(model, inputs), greedy(model, inputs)
        want_stats = handle.stats
        want_loss = model(**inputs, labels=labels).loss
    offloaded = _offloaded(model, how, tmp_path)
    assert offloaded.get_input_embeddings().weight.device.type == "meta"  # really offloaded
    with vlm_prune.pruned(offloaded, method, 0.5, backend=backend) as handle:
        got_logits = logits(offloaded, inputs)
        assert handle.stats == want_stats and handle.stats[0]["kept"] < handle.stats[0]["visual_tokens"]
        got_tokens = greedy(offloaded, inputs)
        with torch.no_grad():
            got_loss = offloaded(**inputs, labels=labels).loss
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_tokens, want_tokens)
