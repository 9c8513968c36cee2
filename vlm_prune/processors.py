"""Processors that build offline where the stock ones cannot.

`Qwen2VLProcessor` / `Qwen2_5_VLProcessor` / `Qwen3VLProcessor` insist on a video processor, which
needs torchvision; torchvision does not import on CPU-only machines with the CUDA wheel.
`QwenImageOnlyProcessor` (Qwen2-VL, Qwen2.5-VL) and `Qwen3ImageOnlyProcessor` (Qwen3-VL) are
the same processors without the video part: images and text only (they return input_ids,
attention_mask, pixel_values, image_grid_thw and the mm_token_type_ids M-RoPE needs).

    from vlm_prune.processors import qwen_image_processor
    processor = qwen_image_processor("./Qwen2-VL-2B-Instruct")      # a local checkpoint folder
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
"""

from __future__ import annotations

from typing import Any

from transformers import ProcessorMixin
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor


class QwenImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL / Qwen2.5-VL processor for images and text, without a video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs: Any):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def qwen_image_processor(model_dir: str, **image_processor_kwargs: Any) -> QwenImageOnlyProcessor:
    """The image-only processor of a local Qwen2-VL / Qwen2.5-VL checkpoint folder (offline)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir, **image_processor_kwargs)
    return QwenImageOnlyProcessor(image_processor, tokenizer, chat_template=getattr(tokenizer, "chat_template", None))


class Qwen3ImageOnlyProcessor(Qwen3VLProcessor):
    """Qwen3-VL processor for images and text, without a video processor (see
    `QwenImageOnlyProcessor`): input_ids, attention_mask, pixel_values, image_grid_thw and
    mm_token_type_ids."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs: Any):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
        self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def qwen3_image_processor(model_dir: str, **image_processor_kwargs: Any) -> Qwen3ImageOnlyProcessor:
    """The image-only processor of a local Qwen3-VL checkpoint folder (offline)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir, **image_processor_kwargs)
    return Qwen3ImageOnlyProcessor(image_processor, tokenizer, chat_template=getattr(tokenizer, "chat_template", None))
