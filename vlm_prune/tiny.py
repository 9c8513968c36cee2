"""Offline builders for small VLMs with random weights and their processors.

No network and no downloaded weights: tokenizers are trained in memory on a few sentences,
image processors use the Pillow backends, models are built from configs. Used by the tests,
the demo and `vlm-prune bench`; useful to anyone trying vlm_prune without a checkpoint.

    model, processor = vlm_prune.tiny.llava(image_size=112)
    inputs = processor(images=[img], text=["USER: <image>\\nWhat is it? ASSISTANT:"], return_tensors="pt")
"""

from __future__ import annotations

from typing import Any

import torch

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]

_CORPUS = [
    "USER: What is in the image? ASSISTANT: a red circle and a blue square on grey.",
    "Describe the picture in one word. What colour is the shape at the top left?",
    "How many green triangles are there? Is there a yellow square? yes no zero one two three four",
    "Answer the question using a single word or phrase.",
]


def tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in memory, with <pad>, <s>, </s> and <image>.

    Left padding (what batched generation needs) is set in the constructor so it is saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def llava_config(
    image_size: int = 112,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int | None = None,
    vision_intermediate: int | None = None,
    vocab_size: int = 320,
    **text_overrides: Any,
):
    """A LlavaConfig (CLIP tower + Llama) of the given sizes; image_size / patch_size tokens per side."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or 2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **text_overrides,
    )
    side = image_size // patch_size
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=SPECIAL_TOKENS.index(IMAGE_TOKEN),
        image_seq_length=side * side,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def llava_processor(config, tok=None):
    """A LlavaProcessor for `config`: Pillow CLIP image processor + the in-memory tokenizer."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tok or tokenizer(config.text_config.vocab_size)
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's [CLS]
    )


def llava(seed: int = 0, dtype: torch.dtype = torch.float32, **sizes: Any):
    """(model, processor): a random-weight LlavaForConditionalGeneration in eval mode."""
    from transformers import LlavaForConditionalGeneration

    config = llava_config(**sizes)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    return model, llava_processor(config)


def random_image(width: int, height: int, seed: int = 0):
    """A PIL RGB image with blocky random content (so attention maps are not uniform)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize((width, height), Image.NEAREST)
    noise = rng.integers(-20, 21, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8))
