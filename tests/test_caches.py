"""The repeat question: the image is encoded once, and the GGUF engine reuses the
KV cache of the common prompt prefix without changing the answer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from support.engines import random_pixels, skip_without
skip_without('torch', 'gguf', 'llama_cpp')
from huatuo_lite import api
from huatuo_lite.backends.base import ImageEmbeds, common_prefix, drop_positions, position_keys
from huatuo_lite.cache import FeatureCache

EXAMPLE = Path(__file__).resolve().parents[1] / "models" / "examples" / "chest_xray.png"
GREEDY = dict(temperature=0, max_new_tokens=8)


@pytest.fixture(autouse=True)
def no_disk_cache(monkeypatch):
    """These tests count in-process reuse; the disk cache has its own (test_prefix_cache.py)."""
    monkeypatch.setenv("HUATUO_LITE_NO_CACHE", "1")


def test_position_keys_and_prefix_helpers():
    image = ImageEmbeds(np.ones((3, 2), np.float32), key="img")
    segs = [[1, 2], image, [7]]
    assert position_keys(segs) == [1, 2, ("img", 0), ("img", 1), ("img", 2), 7]
    assert common_prefix(position_keys(segs), position_keys(segs)) == 5     # one position left to run
    assert common_prefix([1, 2, 3], [1, 9]) == 1
    cut = drop_positions(segs, 3)
    assert isinstance(cut[0], ImageEmbeds) and cut[0].features.shape == (2, 2) and cut[1] == [7]


def test_feature_cache_is_bounded_lru():
    one = np.zeros((4, 4), np.float32)                       # 64 bytes
    cache = FeatureCache(budget_bytes=150)
    cache.put("a", one), cache.put("b", one)
    assert cache.get("a") is not None                        # a is now most recent
    cache.put("c", one)                                      # evicts b
    assert cache.get("b") is None and len(cache) == 2


class CountingEngine:
    """Wraps an engine and counts encode_images calls."""

    def __init__(self, engine):
        self.engine, self.encoded = engine, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def encode_images(self, pixels):
        self.encoded += len(pixels)
        return self.engine.encode_images(pixels)


def test_same_image_is_encoded_once(tiny_7b):
    with api.load(tiny_7b, backend="torch") as model:
        model.engine = counting = CountingEngine(model.engine)
        first = model.ask(EXAMPLE, "What is shown?", **GREEDY)
        again = model.ask(EXAMPLE.read_bytes(), "What is shown?", **GREEDY)   # same pixels, other source
        both = model.ask([EXAMPLE, EXAMPLE], "Compare.", **GREEDY)
        assert counting.encoded == 1 and model.feature_cache.hits == 2   # one lookup per distinct image
        assert first.token_ids == again.token_ids and both.completion_tokens > 0
        model.engine = counting.engine


def test_gguf_prefix_reuse_keeps_answers(gguf_7b_f32):
    with api.load(gguf_7b_f32, backend="gguf", threads=1) as warm, \
            api.load(gguf_7b_f32, backend="gguf", threads=1) as cold:
        warm.ask(EXAMPLE, "What is shown?", **GREEDY)
        follow_up = warm.ask(EXAMPLE, "Is there a nodule?", **GREEDY)
        assert warm.engine.reused_positions > 576               # the image rows were not prefilled again
        fresh = cold.ask(EXAMPLE, "Is there a nodule?", **GREEDY)
        assert cold.engine.reused_positions == 0
        assert follow_up.token_ids == fresh.token_ids


def test_gguf_prefix_reuse_logits_match_full_prefill(gguf_7b_f32):
    from huatuo_lite.backends import load_backend

    engine = load_backend("gguf").open_engine(gguf_7b_f32, threads=1)
    try:
        image = ImageEmbeds(engine.encode_images(random_pixels(1, seed=3))[0], key="x")
        a = [engine.tokenize("<|user|>\n"), image, engine.tokenize("\nFirst question?\n<|assistant|>\n")]
        b = [engine.tokenize("<|user|>\n"), image, engine.tokenize("\nAnother one?\n<|assistant|>\n")]
        engine.prefill(a)
        engine.step(5)
        reused = engine.prefill(b)
        assert engine.reused_positions >= 576
        full = engine.prefill(b, all_logits=True)[-1]
        np.testing.assert_allclose(reused, full, atol=1e-4 * np.abs(full).max())
    finally:
        engine.close()
