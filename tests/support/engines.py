"""Opening engines and building prompts in tests (were the helpers of fixtures_gguf.py and
fixtures_onnx.py; their fixtures are in tests/conftest.py and tests/convert/onnx/conftest.py)."""
from __future__ import annotations

import numpy as np
import pytest

QUESTIONS = (
    "What abnormality is seen in this chest X-ray?",
    "请描述这张腹部CT图像。",
    "Is there evidence of a fracture in the left femur?\nA. Yes\nB. No",
)


def skip_without(*modules: str) -> None:
    """Skip the calling test module when one of these packages is not installed."""
    for module in modules:
        pytest.importorskip(module)


def open_gguf(folder, **options):
    from huatuo_lite.backends import load_backend

    return load_backend("gguf").open_engine(folder, threads=1, **options)


def open_onnx(folder):
    from huatuo_lite.backends import load_backend

    return load_backend("onnx").open_engine(folder, threads=1)


def gguf_segments(engine, features, question=QUESTIONS[0]):
    """The upstream prompt for len(features) images as prefill segments (this engine's tokens)."""
    from huatuo_lite.prompt import Turn, build_segments

    return build_segments([Turn(question=question, n_images=len(features))], engine.tokenize, list(features))


def prompt_segments(engine, features, question=QUESTIONS[0]):
    """The upstream prompt for len(features) images, as prefill segments."""
    return gguf_segments(engine, features, question)


def random_pixels(n: int, seed: int = 0) -> np.ndarray:
    """n random RGB images of odd shapes through image/load.py: [n, 3, 336, 336]."""
    from PIL import Image

    from huatuo_lite.image.load import preprocess

    rng = np.random.default_rng(seed)
    shapes = [(300, 420), (336, 336), (500, 260)]
    return preprocess([Image.fromarray(rng.integers(0, 256, (*shapes[i % 3], 3), dtype=np.uint8))
                       for i in range(n)])


def export_onnx_once(src, tmp_path_factory, label, **options):
    """export_onnx(src) into a fresh session folder (the ONNX fixtures of tests/conftest.py and
    tests/convert/onnx/conftest.py); skips where the converter's packages are missing."""
    for module in ("torch", "onnx", "onnxruntime"):
        pytest.importorskip(module)
    from huatuo_lite.convert.onnx.export import export_onnx

    out = tmp_path_factory.mktemp(f"onnx-{label}")
    export_onnx(src, out, **options)
    return out
