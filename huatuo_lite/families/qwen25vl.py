"""The 2025 family: HuatuoGPT-Vision-7B-Qwen2.5VL, a standard Qwen2.5-VL checkpoint.

Every fact of this family lives here once (checked against transformers 4.57's
`Qwen2VLImageProcessor`, `Qwen2_5_VLForConditionalGeneration.get_rope_index` and the
checkpoint's own chat template):

- Images keep their aspect ratio: `smart_resize` picks a size that is a multiple of
  28 px (14-px patches, 2x2 merge) with min_pixels <= h*w <= max_pixels; no padding.
  Then PIL bicubic, x/255, CLIP mean/std, as the LLaVA family. The image gives
  (h/28)*(w/28) features of the text width: the token count follows the image.
- The vision tower sees the still image twice in time (temporal_patch_size 2) as
  flattened patches [h/14 * w/14, 3*2*14*14] in merge-window order (`patchify`).
- The prompt is Qwen's ChatML (the checkpoint's chat template, default system
  prompt included); each image is "<|vision_start|><|image_pad|><|vision_end|>",
  and the processor repeats <|image_pad|> once per feature.
- Positions are 3-D (multimodal RoPE, `mrope_section` [16, 24, 24] of the head's 64
  rotary pairs): text tokens advance all three streams together; an image's tokens
  share the time position and take row / column offsets; the text after an image
  continues at 1 + the largest position used (`positions`).
- HF generate is called with input_ids, so the repetition penalty also sees the prompt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ImageError
from .common import CLIP_MEAN, CLIP_STD, RESCALE, GenerationConfig, Variant
from .text import QWEN2

NAME = "qwen25vl"

# ----------------------------------------------------------------- image ----
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2          # a still image is repeated in time
MERGE_SIZE = 2                   # 2x2 patches -> one text-width feature
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: the resized sides are multiples of this
# Qwen2VLImageProcessor's class defaults, used only where a folder records none: a converted
# model records the checkpoint's own values in its manifest ("image": {...}) -- Qwen2.5-VL-7B-
# Instruct's preprocessor_config.json says max_pixels 12845056 (16384 tokens: a large photo then
# needs a larger --n-ctx than CONTEXT_LENGTH, and the prompt-length check says so).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200           # smart_resize refuses longer images
PATCH_VALUES = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE   # 1176 values per patch
IMAGE_MEAN, IMAGE_STD = CLIP_MEAN, CLIP_STD    # preprocessor_config.json: OpenAI CLIP's

# ---------------------------------------------------------------- prompt ----
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
IMAGE_TEXT = VISION_START + IMAGE_PAD + VISION_END       # one per image, before the question
DEFAULT_SYSTEM = "You are a helpful assistant."
# Text a question may not hold: the processor would treat it as an image slot / a turn boundary.
RESERVED_TEXT = (VISION_START, IMAGE_PAD, VISION_END, "<|video_pad|>", IM_START, IM_END)
RESERVED_MEANING = "the model reads as an image slot or a turn boundary"
MAX_IMAGES = 6
CONTEXT_LENGTH = 8192            # what we allocate by default (the model holds 128k)

# Qwen2.5-VL-7B-Instruct's generation_config.json; a converted model records the
# checkpoint's own values in its manifest ("generation": {...}).
GENERATION_DEFAULTS = GenerationConfig(temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05,
                                       max_new_tokens=512)
PENALIZE_PROMPT = True           # generate(input_ids=...): the penalty sees the prompt's ids

VARIANT = Variant("7b-qwen25vl", "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", QWEN2.name,
                  "FreedomIntelligence/HuatuoGPT-Vision-7B-Qwen2.5VL", "qwen25vl",
                  notes="Qwen2.5-VL vision tower + merger, Qwen2 text model with M-RoPE")
VARIANTS = {VARIANT.name: VARIANT}

# Checkpoint tensor prefixes by the transformers version that saved it -> our canonical
# names (the older layout, which llama.cpp's converter also reads): longest prefix first.
LAYOUT_PREFIXES = {
    "before-4.52": (("visual.", "visual."), ("model.", "model."), ("lm_head.", "lm_head.")),
    "from-4.52": (("model.visual.", "visual."), ("model.language_model.", "model."), ("lm_head.", "lm_head.")),
}


def smart_resize(height: int, width: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                 factor: int = FACTOR) -> tuple[int, int]:
    """(h, w) multiples of `factor`, area within [min_pixels, max_pixels], aspect kept:
    transformers' smart_resize, with its ValueError turned into our sentence."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"An image of {width}x{height} pixels is more than {MAX_ASPECT_RATIO} times longer "
                         "than wide, which Qwen2.5-VL cannot read: crop it to the region of interest.")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


IMAGE_ADVICE = "fewer or smaller images"   # an image's tokens follow its size


def grid_of(pixels: np.ndarray) -> tuple[int, int]:
    """Merged feature grid (rows, cols) of one preprocessed image [3, h, w]."""
    _, height, width = pixels.shape
    return height // FACTOR, width // FACTOR


def image_tokens(pixels: np.ndarray) -> int:
    rows, cols = grid_of(pixels)
    return rows * cols


def patchify(pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One preprocessed image [3, h, w] -> (patches [h/14*w/14, 1176], grid_thw (1, h/14, w/14)),
    exactly as Qwen2VLImageProcessor flattens it: the frame repeated in time, patches in
    2x2 merge-window order, each patch's values as (channel, time, row, col)."""
    channels, height, width = pixels.shape
    gh, gw = height // PATCH_SIZE, width // PATCH_SIZE
    frames = np.repeat(pixels[None], TEMPORAL_PATCH_SIZE, axis=0)      # [2, 3, h, w]
    x = frames.reshape(1, TEMPORAL_PATCH_SIZE, channels, gh // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE,
                       gw // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gh * gw, PATCH_VALUES)), (1, gh, gw)


# ------------------------------------------------------------- positions ----
@dataclass(frozen=True)
class Span:
    """A run of prompt positions: `length` text tokens, or an image of grid (rows, cols)."""

    length: int
    grid: tuple | None = None


def positions(spans: Sequence[Span], start: int = 0) -> tuple[np.ndarray, int]:
    """3-D positions int64 [3, L] (time, row, col) of a prompt, and the position the next
    token takes: get_rope_index's rule. Text: start+i in all three; an image at s: time s,
    row s+r, col s+c for its (r, c) in row-major order; next = 1 + the largest used."""
    out, nxt = [], start
    for span in spans:
        if span.grid is None:
            run = nxt + np.arange(span.length, dtype=np.int64)
            out.append(np.stack([run, run, run]))
            nxt += span.length
            continue
        rows, cols = span.grid
        r, c = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
        out.append(np.stack([np.full(rows * cols, nxt), nxt + r, nxt + c]))
        nxt += max(rows, cols)
    pos = np.concatenate(out, axis=1) if out else np.zeros((3, 0), np.int64)
    return pos, nxt


# ---------------------------------------------------------------- prompt ----
def render(turns: Sequence, system: str | None = None) -> str:
    """The chat template's text for turns (prompt.Turn: question, n_images, answer), the
    last turn left open: images first in each user turn, as upstream's messages put them.
    The system prompt: `system`, else the first turn's, else the template's default."""
    first = getattr(turns[0], "system", None) if turns else None
    system = next((s for s in (system, first) if s is not None), DEFAULT_SYSTEM)
    text = f"{IM_START}system\n{system}{IM_END}\n"
    for turn in turns:
        text += f"{IM_START}user\n{IMAGE_TEXT * turn.n_images}{turn.question}{IM_END}\n{IM_START}assistant\n"
        if turn.answer is not None:
            text += f"{turn.answer}{IM_END}\n"
    return text


def reserved_in(question: str) -> str | None:
    """The first reserved marker a question holds, or None."""
    return next((marker for marker in RESERVED_TEXT if marker in question), None)
