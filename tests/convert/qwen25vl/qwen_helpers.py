"""Plain helpers for the Qwen2.5-VL tests (fixtures are in conftest.py)."""
from __future__ import annotations

import json

import numpy as np

from huatuo_lite.families import qwen25vl as fam

LAYOUTS = ("before-4.52", "from-4.52")


def open_processor(folder):
    """Qwen2_5_VLProcessor for the folder, loaded the way AutoProcessor does (its
    preprocessor_config, tokenizer and chat template files), without its video processor:
    transformers 4.57's AutoVideoProcessor needs torchvision, which is not installed."""
    from transformers import Qwen2_5_VLProcessor

    class ImageProcessorOnly(Qwen2_5_VLProcessor):
        attributes = ["image_processor", "tokenizer"]

    return ImageProcessorOnly.from_pretrained(str(folder), use_fast=False)


def qwen_pixels(image, min_pixels: int, max_pixels: int) -> np.ndarray:
    """An RGB PIL image -> float32 [3, h, w] as Qwen2VLImageProcessor (slow) preprocesses it."""
    from PIL import Image

    height, width = fam.smart_resize(image.height, image.width, min_pixels, max_pixels)
    resized = image.convert("RGB").resize((width, height), resample=Image.Resampling.BICUBIC)
    scaled = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.asarray(fam.IMAGE_MEAN, np.float32), np.asarray(fam.IMAGE_STD, np.float32)
    return ((scaled - mean) / std).transpose(2, 0, 1)


def noise_image(width: int, height: int, seed: int):
    """A random RGB image: every pixel matters, so resampling differences show."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def user_message(n_images: int, question: str) -> dict:
    """Upstream's message: the images first, then the question."""
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}


def generation_config(folder) -> dict:
    return json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
