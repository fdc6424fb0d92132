"""Session-scoped GGUF conversions of the tiny checkpoints and their torch references.

Each conversion is done once per session. The F32 folders are complete (text +
mmproj + vision.onnx + self-test); the F16/Q8_0/Q4_K_M folders of the 7B are
text-only (vision_onnx=False) because their tests are teacher-forced on text.

Import with `from fixtures_gguf import *  # noqa: F401,F403`.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from huatuo_lite.backends import load_backend  # noqa: E402
from huatuo_lite.prompt import Turn, build_segments  # noqa: E402

__all__ = ["gguf_7b_f32", "gguf_34b_f32", "gguf_7b_hf_f32", "gguf_7b_f16", "gguf_7b_q8_0", "gguf_7b_q4_k_m",
           "open_gguf", "gguf_segments", "random_pixels", "QUESTIONS"]

QUESTIONS = (
    "What abnormality is seen in this chest X-ray?",
    "请描述这张腹部CT图像。",
    "Is there evidence of a fracture in the left femur?\nA. Yes\nB. No",
)


def _convert(src, tmp_path_factory, label, quant, **options):
    from huatuo_lite.convert.gguf_export import export_gguf

    out = tmp_path_factory.mktemp(f"gguf-{label}-{quant}")
    export_gguf(src, out, quant=quant, threads=1, **options)
    return out


@pytest.fixture(scope="session")
def gguf_7b_f32(tiny_7b, tmp_path_factory):
    return _convert(tiny_7b, tmp_path_factory, "7b", "F32")


@pytest.fixture(scope="session")
def gguf_34b_f32(tiny_34b, tmp_path_factory):
    return _convert(tiny_34b, tmp_path_factory, "34b", "F32")


@pytest.fixture(scope="session")
def gguf_7b_hf_f32(tiny_7b_hf, tmp_path_factory):
    return _convert(tiny_7b_hf, tmp_path_factory, "7b-hf", "F32")


@pytest.fixture(scope="session")
def gguf_7b_f16(tiny_7b, tmp_path_factory):
    return _convert(tiny_7b, tmp_path_factory, "7b", "F16", vision_onnx=False)


@pytest.fixture(scope="session")
def gguf_7b_q8_0(tiny_7b, tmp_path_factory):
    return _convert(tiny_7b, tmp_path_factory, "7b", "Q8_0", mmproj_type="Q8_0", vision_onnx=False)


@pytest.fixture(scope="session")
def gguf_7b_q4_k_m(tiny_7b, tmp_path_factory):
    return _convert(tiny_7b, tmp_path_factory, "7b", "Q4_K_M", vision_onnx=False)


def open_gguf(folder, **options):
    return load_backend("gguf").open_engine(folder, threads=1, **options)


def gguf_segments(engine, features, question=QUESTIONS[0]):
    """The upstream prompt for len(features) images as prefill segments (this engine's tokens)."""
    return build_segments([Turn(question=question, n_images=len(features))], engine.tokenize, list(features))


def random_pixels(n: int, seed: int = 0) -> np.ndarray:
    """n random RGB images of odd shapes through image.py: [n, 3, 336, 336]."""
    from PIL import Image

    from huatuo_lite.image import preprocess

    rng = np.random.default_rng(seed)
    shapes = [(300, 420), (336, 336), (500, 260)]
    return preprocess([Image.fromarray(rng.integers(0, 256, (*shapes[i % 3], 3), dtype=np.uint8))
                       for i in range(n)])
