"""Loading a local transformers VLM checkpoint offline, and its prompt template.

    model, processor, family = load_local("./llava-1.5-7b-hf", device="cpu", dtype="auto")
    text = prompt_for(processor, family, "What is it?\\nAnswer the question using a single word or phrase.")

The model class comes from config.json's model_type (AutoModelForImageTextToText; the model
types vlm_prune supports: `vlm_prune.registry.FAMILIES`); nothing is downloaded (local_files_only). Processor: AutoProcessor; for Qwen, where it needs a
video processor (torchvision), `vlm_prune.processors.qwen_image_processor` instead. The
tokenizer is set to left padding (batched greedy generation needs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_type(model_dir: str | Path) -> str:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (--model must be a local checkpoint folder)")
    from vlm_prune.registry import supported_model_types

    kind = json.loads(path.read_text()).get("model_type")
    if kind not in supported_model_types():
        raise ValueError(f"{path}: model_type {kind!r} is not supported; choose from {', '.join(supported_model_types())}")
    return kind


def resolve(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """"auto" device: cuda if available; "auto" dtype: bfloat16 on cuda, float32 on cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose auto, {', '.join(_DTYPES)}")
    return device, _DTYPES[dtype]


def load_processor(model_dir: str | Path, family: str):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
        if not hasattr(processor, "image_processor"):  # a bare tokenizer came back
            raise TypeError(f"AutoProcessor returned {type(processor).__name__}, not a processor")
    except Exception as e:
        if not family.startswith("qwen"):
            raise RuntimeError(f"{model_dir}: AutoProcessor cannot load the processor ({e})") from e
        from vlm_prune.processors import qwen_image_processor

        processor = qwen_image_processor(str(model_dir))
    processor.tokenizer.padding_side = "left"
    return processor


def load_local(model_dir: str | Path, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode on `device`, processor, model_type)."""
    from transformers import AutoModelForImageTextToText  # the class of config.json's model_type

    family = model_type(model_dir)
    device, torch_dtype = resolve(device, dtype)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch_dtype, local_files_only=True)
    model = model.to(device).eval()
    return model, load_processor(model_dir, family), family


def prompt_for(processor, family: str, text: str) -> str:
    """The full prompt for one image + text: the checkpoint's chat template if it has one, else
    LLaVA-1.5's "USER: <image>\\n... ASSISTANT:" or Qwen's chat format."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if family.startswith("qwen"):
        return ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                f"{text}<|im_end|>\n<|im_start|>assistant\n")
    return f"USER: <image>\n{text} ASSISTANT:"
