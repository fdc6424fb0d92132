"""families.qwen25vl against transformers' own processor and model on the tiny checkpoint:
the rendered prompt (the checkpoint's chat template), the pixels (smart_resize + PIL
bicubic + CLIP mean/std, then patchify), and the 3-D M-RoPE positions (get_rope_index)."""
from __future__ import annotations

import numpy as np
import pytest
from qwen_helpers import noise_image, qwen_pixels, user_message

from huatuo_lite.families import qwen25vl as fam
from huatuo_lite.prompt import Turn

CONVERSATIONS = {  # name -> turns (the last one open)
    "no image": [Turn("What is an X-ray?", 0)],
    "one image": [Turn("What abnormality is seen?", 1)],
    "two images": [Turn("Compare the two CT scans.", 2)],
    "two turns": [Turn("What is shown?", 1, "A chest radiograph."), Turn("Is there pneumonia?", 1)],
}


def _messages(turns) -> list:
    messages = []
    for turn in turns:
        messages.append(user_message(turn.n_images, turn.question))
        if turn.answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
    return messages


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_equals_the_checkpoint_template(name, qwen_processors):
    turns = CONVERSATIONS[name]
    for processor in qwen_processors.values():       # chat_template.json and chat_template.jinja
        want = processor.apply_chat_template(_messages(turns), add_generation_prompt=True)
        assert fam.render(turns) == want
    assert fam.render(turns).count(fam.IMAGE_TEXT) == sum(t.n_images for t in turns)


SIZES = {"336x336": (336, 336), "448x448": (448, 448), "1024x768": (1024, 768), "tall 200x900": (200, 900)}


@pytest.mark.parametrize("name", list(SIZES))
def test_pixels_and_patches_equal_the_processor(name, qwen_processors):
    processor = qwen_processors["before-4.52"]
    width, height = SIZES[name]
    image = noise_image(width, height, seed=width + height)
    want = processor.image_processor(images=[image], return_tensors="np")
    pixels = qwen_pixels(image, processor.image_processor.min_pixels, processor.image_processor.max_pixels)
    patches, grid = fam.patchify(pixels)
    assert tuple(want["image_grid_thw"][0]) == grid == (1, pixels.shape[1] // 14, pixels.shape[2] // 14)
    assert patches.shape == want["pixel_values"].shape
    np.testing.assert_allclose(patches, want["pixel_values"], rtol=0, atol=1e-6)
    assert fam.image_tokens(pixels) == grid[1] * grid[2] // fam.MERGE_SIZE ** 2


def test_runtime_preprocessing_equals_the_processor(qwen_processors):
    """huatuo_lite/image/load.py's Qwen2.5-VL path, where the coordinator has landed it."""
    load = pytest.importorskip("huatuo_lite.image.load")
    if not hasattr(load, "FITS") or "qwen25vl" not in load.FITS:
        pytest.skip("huatuo_lite.image.load has no Qwen2.5-VL preprocessing yet")
    processor = qwen_processors["before-4.52"]
    for width, height in SIZES.values():
        image = noise_image(width, height, seed=width * height)
        pixels = load.pixel_values(image, load.FITS["qwen25vl"])
        want = processor.image_processor(images=[image], return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(fam.patchify(pixels)[0], want, rtol=0, atol=1e-6)


def _spans(input_ids: list, image_token: int, grids: list) -> list:
    """Cut HF's input_ids into text runs and image runs (of <|image_pad|>) with their grids."""
    spans, run, grids = [], 0, iter(grids)
    i = 0
    while i < len(input_ids):
        if input_ids[i] != image_token:
            run, i = run + 1, i + 1
            continue
        if run:
            spans.append(fam.Span(run))
            run = 0
        grid = next(grids)
        spans.append(fam.Span(grid[0] * grid[1], grid))
        i += grid[0] * grid[1]
    return spans + ([fam.Span(run)] if run else [])


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_positions_equal_get_rope_index(n_images, qwen_processors, qwen_engines):
    import torch

    processor, model = qwen_processors["before-4.52"], qwen_engines["before-4.52"].model
    images = [noise_image(w, h, seed=w) for w, h in ((336, 336), (448, 224))[:n_images]]
    text = processor.apply_chat_template([user_message(n_images, "Describe it.")], add_generation_prompt=True)
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    grid_thw = inputs.get("image_grid_thw")
    with torch.no_grad():
        want, deltas = model.model.get_rope_index(inputs["input_ids"], grid_thw, None,
                                                  attention_mask=inputs["attention_mask"])
    grids = [(int(h) // fam.MERGE_SIZE, int(w) // fam.MERGE_SIZE) for _, h, w in
             (grid_thw.tolist() if grid_thw is not None else [])]
    ids = inputs["input_ids"][0].tolist()
    got, nxt = fam.positions(_spans(ids, model.config.image_token_id, grids))
    np.testing.assert_array_equal(got, want[:, 0].numpy())
    assert nxt == len(ids) + int(deltas[0])        # where HF generate puts the next token
    assert (n_images == 0) == bool((got[0] == got[1]).all() and (got[1] == got[2]).all())
