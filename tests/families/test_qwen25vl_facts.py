"""The Qwen2.5-VL family's runtime facts against transformers' own functions (generated
inputs): image sizes, patch order, prompt layout, positions, sampler's prompt penalty."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from huatuo_lite.backends.base import ImageEmbeds, mrope_positions
from huatuo_lite.errors import ImageError, PromptError
from huatuo_lite.families import family_module, qwen25vl
from huatuo_lite.image.load import FITS, load_request
from huatuo_lite.prompt import IMAGE_SLOT, Turn, build_segments, chatml_token_layout
from huatuo_lite.sampler import Sampler

hf_qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6000), st.integers(1, 6000),
       st.sampled_from([(3136, 1003520), (3136, 12845056), (784, 50176)]))
def test_smart_resize_is_transformers(height, width, bounds):
    try:
        expected = hf_qwen.smart_resize(height, width, 28, *bounds)
    except ValueError:
        with pytest.raises(ImageError, match="crop it"):
            qwen25vl.smart_resize(height, width, *bounds)
        return
    assert qwen25vl.smart_resize(height, width, *bounds) == expected


@pytest.mark.parametrize("size", [(336, 336), (448, 448), (1024, 768), (200, 900), (57, 1000)])
def test_preprocessing_and_patches_are_the_slow_processors(size):
    width, height = size
    rgb = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    processor = hf_qwen.Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)
    expected = processor(images=[rgb], return_tensors="np")
    (pixels,) = load_request([rgb], lambda img: FITS["qwen25vl"](img, 3136, 12845056))
    patches, grid = qwen25vl.patchify(pixels)
    assert tuple(expected["image_grid_thw"][0]) == grid
    np.testing.assert_array_equal(patches, expected["pixel_values"])
    assert qwen25vl.image_tokens(pixels) == grid[1] * grid[2] // 4


def test_prompt_layout_has_one_slot_per_image_and_refuses_reserved_text():
    tokenize = lambda text: [ord(c) for c in text]   # a stand-in: one id per character
    turns = [Turn("first?", 1, "yes"), Turn("second?", 2)]
    ids = chatml_token_layout(turns, tokenize)
    assert ids.count(IMAGE_SLOT) == 3
    text = qwen25vl.render(turns)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert text.endswith("second?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(PromptError, match="image slot or a turn boundary"):
        chatml_token_layout([Turn("what is <|image_pad|>?", 0)], tokenize)
    with pytest.raises(PromptError, match="at most 6"):
        chatml_token_layout([Turn("q", 7)], tokenize)
    features = [ImageEmbeds(np.zeros((4, 8), np.float32), grid=(2, 2)) for _ in range(3)]
    segments = build_segments(turns, tokenize, features, "qwen25vl")
    assert sum(isinstance(s, ImageEmbeds) for s in segments) == 3


def test_positions_follow_get_rope_index_rule():
    segments = [[1, 2, 3], ImageEmbeds(np.zeros((6, 4), np.float32), grid=(2, 3)), [4, 5]]
    pos, nxt = mrope_positions(segments)
    assert pos.tolist() == [[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],
                            [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
                            [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]]
    assert nxt == 8
    with pytest.raises(PromptError, match="grid None"):
        mrope_positions([ImageEmbeds(np.zeros((6, 4), np.float32))])


def test_prompt_penalty_sees_prompt_ids_only_when_asked():
    config = family_module("qwen25vl").GENERATION_DEFAULTS.with_overrides(temperature=0)
    logits = np.array([1.0, 0.99, -1.0], np.float32)
    assert Sampler(config)(logits) == 0
    assert Sampler(config, prompt_ids=[0])(logits) == 1   # 1.0 / 1.05 < 0.99
