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


QWEN_TOKENS = {
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}

# The tiny Qwen models' chat template: Qwen-VL's format without a default system prompt (one user
# message with an image and a question gives exactly `qwen_prompt`'s slot inside
# "<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n", the eval harness's Qwen prompt).
# Set on the tokenizer and the processor, so save_pretrained writes chat_template.jinja and an
# OpenAI-compatible vLLM server can answer chat completions; the <|im_*|> markers are plain
# BPE text here (no token is added, no id changes).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] in ['video', 'video_url'] -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def tokenizer(vocab_size: int = 320, named_tokens: dict[str, str] | None = None):
    """A byte-level BPE tokenizer trained in memory, with <pad>=0, <s>=1, </s>=2 and the named
    special tokens after them (default: LLaVA's <image>=3).

    Left padding (what batched generation needs) is set in the constructor so it is saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    named_tokens = named_tokens or {"image_token": IMAGE_TOKEN}
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS[:3] + list(named_tokens.values()),
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
        extra_special_tokens=named_tokens,
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


def llava_next(seed: int = 0, dtype: torch.dtype = torch.float32, image_size: int = 56, **sizes: Any):
    """(model, processor): a random-weight LlavaNextForConditionalGeneration (anyres).

    Crops are image_size px (image_size / 14 tokens per side); grid pinpoints are the
    LLaVA-NeXT ones scaled to image_size (1x2, 2x1, 2x2, 3x1, 1x3 crops). At image_size=336
    a 640x480 image gives 2340 visual tokens, as in LLaVA-NeXT-7B.
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    base = llava_config(image_size=image_size, **sizes)
    s = image_size
    pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_id=base.image_token_id,
        image_grid_pinpoints=pinpoints,
        image_seq_length=base.image_seq_length,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).to(dtype).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer(config.text_config.vocab_size),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def _qwen_tokenizer(vocab_size: int):
    """(tokenizer with `QWEN_CHAT_TEMPLATE`, the config's placeholder token ids) of the tiny Qwen-VL families."""
    tok = tokenizer(vocab_size, QWEN_TOKENS)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in QWEN_TOKENS.items()}
    return tok, dict(image_token_id=ids["image_token"], video_token_id=ids["video_token"],
                     vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"])


def _mrope_section(rotary_dim: int) -> list[int]:
    """M-RoPE's (t, h, w) split of a head's rotated dimensions: it must sum to rotary_dim / 2."""
    quarter = rotary_dim // 2 // 4
    return [rotary_dim // 2 - 2 * quarter, quarter, quarter]


def qwen2_vl(seed: int = 0, dtype: torch.dtype = torch.float32, version: str = "2", vision_depth: int = 2,
             vision_hidden: int = 32, vision_heads: int = 4, vision_intermediate: int | None = None,
             text_hidden: int = 64, text_layers: int = 2, text_heads: int = 4, text_kv_heads: int = 2,
             text_intermediate: int | None = None, vocab_size: int = 320,
             min_pixels: int = 4 * 28 * 28, max_pixels: int = 256 * 28 * 28):
    """(model, processor): a random-weight Qwen2-VL (version="2") or Qwen2.5-VL ("2.5").

    Patches of 14 px, 2x2 merge (one LLM token per 28x28 px); the processor resizes images to
    between min_pixels and max_pixels. Qwen2.5-VL gets 56 px windows (2x2 merged tokens each),
    full attention in its last block. The processor is `vlm_prune.processors.QwenImageOnlyProcessor`.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .processors import QwenImageOnlyProcessor

    tok, token_ids = _qwen_tokenizer(vocab_size)
    head_dim = text_hidden // text_heads
    text = dict(
        vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=text_intermediate or 2 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_kv_heads,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": _mrope_section(head_dim)},
    )
    vision = dict(depth=vision_depth, num_heads=vision_heads, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if version == "2":
        vision.update(embed_dim=vision_hidden, hidden_size=text_hidden,
                      mlp_ratio=(vision_intermediate or 2 * vision_hidden) // vision_hidden)
        config, cls = Qwen2VLConfig(vision_config=vision, text_config=text, **token_ids), Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision.update(hidden_size=vision_hidden, out_hidden_size=text_hidden,
                      intermediate_size=vision_intermediate or 2 * vision_hidden,
                      window_size=56, fullatt_block_indexes=[vision_depth - 1])
        config, cls = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **token_ids), Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version={version!r}: choose '2' (Qwen2-VL) or '2.5' (Qwen2.5-VL)")
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    return model, QwenImageOnlyProcessor(image_processor, tok, chat_template=QWEN_CHAT_TEMPLATE)


def qwen3_vl(seed: int = 0, dtype: torch.dtype = torch.float32, moe: bool = False, vision_depth: int = 3,
             deepstack_layers: tuple[int, ...] = (0, 1), vision_hidden: int = 32, vision_heads: int = 4,
             vision_intermediate: int | None = None, text_hidden: int = 64, text_layers: int = 3,
             text_heads: int = 4, text_kv_heads: int = 2, text_intermediate: int | None = None,
             vocab_size: int = 320, min_pixels: int = 4 * 32 * 32, max_pixels: int = 256 * 32 * 32):
    """(model, processor): a random-weight Qwen3-VL (moe=True: Qwen3-VL-MoE, 4 experts, 2 per token).

    Patches of 16 px, 2x2 merge (one LLM token per 32x32 px); the processor resizes images to
    between min_pixels and max_pixels. The vision blocks listed in `deepstack_layers` feed the
    DeepStack mergers, whose features are added to the outputs of the first len(deepstack_layers)
    decoder layers at the image tokens (Qwen3-VL-8B: blocks 8, 16, 24 of 27). Text attention has
    Qwen3's q/k RMS norms; M-RoPE is interleaved. The processor is
    `vlm_prune.processors.Qwen3ImageOnlyProcessor`.
    """
    from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                              Qwen3VLMoeForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .processors import Qwen3ImageOnlyProcessor

    tok, token_ids = _qwen_tokenizer(vocab_size)
    head_dim = text_hidden // text_heads
    text = dict(
        vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=text_intermediate or 2 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_kv_heads,
        head_dim=head_dim, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                         "mrope_section": _mrope_section(head_dim)},
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text_hidden, decoder_sparse_step=1)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, num_heads=vision_heads,
                  intermediate_size=vision_intermediate or 2 * vision_hidden, out_hidden_size=text_hidden,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  num_position_embeddings=64, deepstack_visual_indexes=list(deepstack_layers))
    config_cls, cls = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe
                       else (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    config = config_cls(vision_config=vision, text_config=text, **token_ids)
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=16,
                                               merge_size=2, temporal_patch_size=2,
                                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return model, Qwen3ImageOnlyProcessor(image_processor, tok, chat_template=QWEN_CHAT_TEMPLATE)


def qwen_prompt(question: str, n_images: int = 1) -> str:
    """A Qwen-VL prompt with `n_images` image slots before the question."""
    return "<|vision_start|><|image_pad|><|vision_end|>" * n_images + question


def random_image(width: int, height: int, seed: int = 0):
    """A PIL RGB image with blocky random content (so attention maps are not uniform)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize((width, height), Image.NEAREST)
    noise = rng.integers(-20, 21, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8))


def qwen3_5(seed: int = 0, dtype: torch.dtype = torch.float32, moe: bool = False, vision_depth: int = 2,
            vision_hidden: int = 32, vision_heads: int = 4, vision_intermediate: int | None = None,
            text_hidden: int = 64, text_heads: int = 4, text_kv_heads: int = 2, head_dim: int = 16,
            layer_types: tuple[str, ...] = ("full_attention", "linear_attention", "full_attention", "linear_attention"),
            text_intermediate: int | None = None, vocab_size: int = 320,
            min_pixels: int = 4 * 32 * 32, max_pixels: int = 256 * 32 * 32):
    """(model, processor): a random-weight Qwen3.5 (moe=True: Qwen3.5-MoE, 4 experts, 2 per token,
    and a shared expert).

    A hybrid decoder: `layer_types` lists each layer's token mixer, "linear_attention" (a Gated
    DeltaNet: a causal convolution and a recurrent state, no KV cache) or "full_attention"
    (softmax attention with an output gate, per-head q/k RMS norms and partial M-RoPE: half of
    each head's dimensions rotate, interleaved (t, h, w) sections). The released models put one
    full-attention layer after every three linear ones; this default starts with a full one so
    that in-LLM stages after layer 1 or 3 are allowed (see patches/adapters/qwen3_5.py). The
    vision tower is Qwen3-VL's without DeepStack: 16 px patches, 2x2 merge (one LLM token per
    32x32 px). The processor is `vlm_prune.processors.Qwen3ImageOnlyProcessor` (Qwen3.5
    checkpoints ship Qwen3-VL's processor).
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .processors import Qwen3ImageOnlyProcessor

    tok, token_ids = _qwen_tokenizer(vocab_size)
    rotary = head_dim // 2  # partial_rotary_factor 0.5
    text = dict(
        vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=text_intermediate or 2 * text_hidden,
        num_hidden_layers=len(layer_types), layer_types=list(layer_types), num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads, head_dim=head_dim, max_position_embeddings=4096,
        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "mrope_interleaved": True, "mrope_section": _mrope_section(rotary)},
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text_hidden,
                    shared_expert_intermediate_size=text_hidden)
        del text["intermediate_size"]
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, num_heads=vision_heads,
                  intermediate_size=vision_intermediate or 2 * vision_hidden, out_hidden_size=text_hidden,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  num_position_embeddings=64)
    if moe:
        from transformers import Qwen3_5MoeConfig as config_cls, Qwen3_5MoeForConditionalGeneration as cls
    else:
        from transformers import Qwen3_5Config as config_cls, Qwen3_5ForConditionalGeneration as cls
    config = config_cls(vision_config=vision, text_config=text, **token_ids)
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=16,
                                               merge_size=2, temporal_patch_size=2,
                                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return model, Qwen3ImageOnlyProcessor(image_processor, tok, chat_template=QWEN_CHAT_TEMPLATE)
