"""The Qwen2.5-VL bench profiles (issue #20) are well-formed, and the size-parameterised
tiny maker builds, through the profiles' own build path, a folder the reader opens."""
from __future__ import annotations

import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import profiles  # noqa: E402
from huatuo_lite.convert.qwen25vl import tiny  # noqa: E402
from huatuo_lite.convert.qwen25vl.checkpoint import open_qwen25vl  # noqa: E402
from huatuo_lite.errors import HuatuoError  # noqa: E402

QWEN_PROFILES = ("qwen25vl-small", "qwen25vl-7b")
# Qwen/Qwen2.5-VL-7B-Instruct's vision_config (the tower both profiles keep)
REAL_VISION = dict(vision_hidden_size=1280, vision_intermediate_size=3420, vision_depth=32, vision_heads=16,
                   fullatt_block_indexes=(7, 15, 23, 31), window_size=112)
TEXT = {"qwen25vl-small": dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                               num_kv_heads=2, vocab_rows=151936, mrope_section=(8, 12, 12)),
        "qwen25vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                            num_kv_heads=4, vocab_rows=152064, mrope_section=(16, 24, 24))}


@pytest.mark.parametrize("name", QWEN_PROFILES)
def test_profile_is_the_real_tower_beside_its_text_shape_and_passes_the_makers_rules(name):
    profile = profiles.get_profile(name)
    assert profile.maker == "make_tiny_qwen25vl"
    assert profile.maker in profiles.CONVERTERS and profile.maker in profiles.MAKERS
    sizes = replace(tiny.QwenTinySizes(), **profile.sizes)          # unknown keys would raise here
    assert {key: getattr(sizes, key) for key in REAL_VISION} == REAL_VISION
    assert {key: getattr(sizes, key) for key in TEXT[name]} == TEXT[name]
    assert [why for rule, why in tiny.SIZE_RULES if not rule(sizes)] == []
    head = sizes.hidden_size // sizes.num_heads
    assert 2 * sum(sizes.mrope_section) == head                      # 64 -> [8, 12, 12], 128 -> [16, 24, 24]
    labels = profiles.all_labels(profile)
    assert set(profile.skip_by_default) <= set(labels) and set(profile.row_gb) <= set(labels)
    assert [f"gguf {q}" for q in profile.gguf_quants] == ["gguf F16", "gguf Q4_K_M"]


def test_the_7b_profile_runs_nothing_by_default_and_small_runs_its_gguf_rows():
    assert profiles.default_labels(profiles.get_profile("qwen25vl-7b")) == []
    assert profiles.default_labels(profiles.get_profile("qwen25vl-small")) == ["gguf F16", "gguf Q4_K_M"]
    # LLaVA profiles keep their maker and its arguments
    assert profiles.get_profile("small").maker == "make_tiny" and profiles.MAKERS["make_tiny"]["variant"] == "7b"


def test_default_sizes_are_unchanged():
    """The existing tiny folders (and their tests) rest on these defaults."""
    defaults = tiny.QwenTinySizes()
    assert (defaults.hidden_size, defaults.num_heads, defaults.mrope_section, defaults.vocab_rows) == \
        (256, 2, (16, 24, 24), 0)
    assert {f.name for f in fields(defaults)} >= set(REAL_VISION) | set(TEXT["qwen25vl-small"])


TINY_SIZES = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, num_kv_heads=1,
                  vocab_rows=2048, mrope_section=(8, 12, 12), vision_hidden_size=64, vision_intermediate_size=96,
                  vision_depth=2, vision_heads=2, fullatt_block_indexes=(1,), num_shards=2)


def test_profile_build_path_writes_a_folder_the_reader_opens(tmp_path):
    """profiles.prepare runs the maker in a child process from JSON (tuples arrive as lists)."""
    profile = profiles.Profile("qwen-test", TINY_SIZES, "test", maker="make_tiny_qwen25vl", checkpoint_gb=0)
    targets, built = profiles.prepare(profile, tmp_path, [], threads=1)
    assert targets == [] and built["checkpoint"]["seconds"] > 0
    ckpt = open_qwen25vl(tmp_path / "qwen-test" / "ckpt")
    assert (ckpt.text.hidden_size, ckpt.text.head_dim, ckpt.text.mrope_section, ckpt.text.vocab_size) == \
        (128, 64, (8, 12, 12), 2048)
    assert (ckpt.vision.depth, ckpt.vision.hidden_size, ckpt.vision.out_hidden_size,
            ckpt.vision.fullatt_block_indexes) == (2, 64, 128, (1,))
    names = {name for name, _ in ckpt.iter_tensors()}
    assert "model.embed_tokens.weight" in names and "visual.merger.mlp.2.weight" in names


@pytest.mark.parametrize("change, sentence", [
    (dict(mrope_section=(16, 24, 24)), "twice the sum of mrope_section"),
    (dict(mrope_section=(8, 24)), "three positive rotary-pair counts"),
    (dict(mrope_section=(0, 16, 16)), "three positive rotary-pair counts"),
    (dict(vocab_rows=1000), "below the tokenizer's"),
])
def test_bad_sizes_are_one_sentence_and_leave_no_folder(tmp_path, change, sentence):
    out = tmp_path / "ckpt"
    with pytest.raises(HuatuoError, match=sentence) as caught:
        tiny.make_tiny_qwen25vl(out, **{**TINY_SIZES, **change})
    assert "\n" not in str(caught.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []

