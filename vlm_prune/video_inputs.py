"""Qwen-VL video inputs built offline, without a video processor.

The stock Qwen video processors need torchvision, which does not import on CPU-only machines
with the CUDA wheel. `qwen_video_inputs` builds what they build from decoded frames, with the
model's own image processor doing the resizing and normalisation:

- each frame goes through the image processor (which tiles a still image over the temporal
  patch); frames 2j and 2j+1 then share one temporal patch, as a video processor pairs them;
- the prompt's `<|video_pad|>` slot is expanded to the video's tokens: one run for Qwen2-VL /
  Qwen2.5-VL, one run per temporal patch after its timestamp ("<1.0 seconds>") for Qwen3-VL;
- `mm_token_type_ids` marks video tokens 2 (images 1), which M-RoPE reads.

    from vlm_prune import tiny
    from vlm_prune.video_inputs import qwen_video_inputs
    model, processor = tiny.qwen2_vl()
    frames = [tiny.random_image(84, 56, seed=i) for i in range(4)]
    inputs = qwen_video_inputs(processor, "<|vision_start|><|video_pad|><|vision_end|>What happens?", [frames])
    model.generate(**inputs, max_new_tokens=8)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import BatchFeature

VIDEO_SLOT = "<|video_pad|>"
IMAGE_SLOT = "<|image_pad|>"


def qwen_video_inputs(processor: Any, text: str | list[str], videos: Sequence[Sequence[Any]], images: Any = None,
                      fps: float = 2.0, timestamps: bool | None = None) -> Any:
    """The model inputs of prompts with videos (and optionally images) for a Qwen-VL processor.

    text: one prompt or a batch; each `<|video_pad|>` is one video, in order over the batch.
    videos: per video, its frames (PIL images of one size; an odd count repeats the last frame,
    as the video processors pad to the temporal patch). images: passed to the processor as is.
    fps: the frames' sampling rate (Qwen3-VL's timestamps). timestamps: per-patch timestamps in
    the prompt (Qwen3-VL); None: when the processor is a Qwen3-VL one.
    Returns the processor's BatchFeature with pixel_values_videos [P, C * 2 * p * p],
    video_grid_thw [V, 3] (and second_per_grid_ts for Qwen2.5-VL-style processors) added."""
    texts = [text] if isinstance(text, str) else list(text)
    slots = sum(t.count(VIDEO_SLOT) for t in texts)
    if slots != len(videos):
        raise ValueError(f"the prompts have {slots} {VIDEO_SLOT} slots for {len(videos)} videos")
    image_processor = processor.image_processor
    tp = image_processor.temporal_patch_size
    merge = image_processor.merge_size
    if timestamps is None:
        timestamps = "Qwen3" in type(processor).__name__
    patches, grids = [], []
    for i, frames in enumerate(videos):
        frames = list(frames)
        if not frames:
            raise ValueError(f"video {i} has no frames")
        if len({f.size for f in frames}) != 1:
            raise ValueError(f"video {i}: frames of different sizes {sorted({f.size for f in frames})}")
        frames += [frames[-1]] * (-len(frames) % tp)
        out = image_processor(images=frames, return_tensors="pt")
        per_frame = out["pixel_values"].view(len(frames), -1, out["pixel_values"].shape[-1])
        _, h, w = out["image_grid_thw"][0].tolist()
        # [frames, h*w, C, tp, p, p]: every frame's own patch sits in each temporal copy
        per_frame = per_frame.view(len(frames), h * w, -1, tp, image_processor.patch_size ** 2)
        t = len(frames) // tp
        # temporal patch j holds frames j*tp .. j*tp+tp-1, one in each temporal slot
        video = torch.stack([per_frame[j * tp + s, :, :, s] for j in range(t) for s in range(tp)])
        video = video.view(t, tp, h * w, -1, image_processor.patch_size ** 2).permute(0, 2, 3, 1, 4)
        patches.append(video.reshape(t * h * w, -1))
        grids.append([t, h, w])
    expanded, v = [], 0
    for prompt in texts:
        pieces = prompt.split(VIDEO_SLOT)
        out_text = pieces[0]
        for piece in pieces[1:]:
            t, h, w = grids[v]
            per_patch = h * w // merge ** 2
            if timestamps:  # Qwen3-VL: each temporal patch in its own vision run after its time
                # (inside the slot's own start/end tokens, as the stock processor expands it)
                times = [(j * tp + (tp - 1) / 2) / fps for j in range(t)]
                out_text += "".join(f"<{s:.1f} seconds>{processor.vision_start_token}{VIDEO_SLOT * per_patch}"
                                    f"{processor.vision_end_token}" for s in times)
            else:
                out_text += VIDEO_SLOT * (t * per_patch)
            out_text += piece
            v += 1
        expanded.append(out_text)
    tokenizer = processor.tokenizer
    inputs = {}
    if images is not None:  # expanded here too: the stock processor refuses video slots without videos
        inputs.update(image_processor(images=images, return_tensors="pt"))
        sizes = iter((inputs["image_grid_thw"].prod(-1) // merge ** 2).tolist())
        expanded = [_expand(t, IMAGE_SLOT, sizes) for t in expanded]
    encoded = tokenizer(expanded, return_tensors="pt", padding=True)
    ids = encoded["input_ids"]
    types = torch.zeros_like(ids)
    types[ids == tokenizer.convert_tokens_to_ids(IMAGE_SLOT)] = 1
    types[ids == tokenizer.convert_tokens_to_ids(VIDEO_SLOT)] = 2
    inputs.update(input_ids=ids, attention_mask=encoded["attention_mask"], mm_token_type_ids=types,
                  pixel_values_videos=torch.cat(patches), video_grid_thw=torch.tensor(grids, dtype=torch.long))
    return BatchFeature(inputs)


def _expand(text: str, slot: str, sizes) -> str:
    """`text` with each `slot` repeated as many times as the next of `sizes` says."""
    pieces = text.split(slot)
    return pieces[0] + "".join(slot * next(sizes) + piece for piece in pieces[1:])
