"""Session-scoped ONNX exports of the tiny checkpoints, each done once.

The quantized folders come from export_onnx(quant=...) as the CLI makes them:
embed and decoder streamed and quantized per tensor (onnx_stream). The graph
quantizer route (quantize_onnx from the fp32 folder) is held to them in
test_onnx_stream.py.

Import the fixtures into a test module with
`from fixtures_onnx import *  # noqa: F401,F403`.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from huatuo_lite.backends import load_backend  # noqa: E402
from huatuo_lite.prompt import Turn, build_segments  # noqa: E402

__all__ = ["onnx_7b", "onnx_34b", "onnx_7b_int8", "onnx_7b_int4", "onnx_7b_fp16", "ref_7b", "ref_34b",
           "pixels", "prompt_segments", "open_onnx"]


@pytest.fixture(scope="session")
def onnx_7b(tiny_7b, tmp_path_factory):
    from huatuo_lite.convert.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx-7b-fp32")
    export_onnx(tiny_7b, out, quant="fp32")
    return out


@pytest.fixture(scope="session")
def onnx_34b(tiny_34b, tmp_path_factory):
    """The 34B (llama/Yi, SentencePiece) export uses the >2 GB layout: every graph's
    weights in a .data file, so the fp32 checks also prove that layout loads."""
    from huatuo_lite.convert.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx-34b-fp32-external")
    export_onnx(tiny_34b, out, quant="fp32", force_external_data=True)
    return out


def _quantized(tiny_7b, tmp_path_factory, quant, **options):
    from huatuo_lite.convert.onnx_export import export_onnx

    out = tmp_path_factory.mktemp(f"onnx-7b-{quant}")
    export_onnx(tiny_7b, out, quant=quant, **options)
    return out


@pytest.fixture(scope="session")
def onnx_7b_int8(tiny_7b, tmp_path_factory):
    return _quantized(tiny_7b, tmp_path_factory, "int8", vision_quant="int8")


@pytest.fixture(scope="session")
def onnx_7b_int4(tiny_7b, tmp_path_factory):
    return _quantized(tiny_7b, tmp_path_factory, "int4")


@pytest.fixture(scope="session")
def onnx_7b_fp16(tiny_7b, tmp_path_factory):
    return _quantized(tiny_7b, tmp_path_factory, "fp16")


@pytest.fixture(scope="session")
def ref_7b(torch_7b):
    """The torch reference engine (one per session, shared with the GGUF tests)."""
    return torch_7b


@pytest.fixture(scope="session")
def ref_34b(torch_34b):
    return torch_34b


def open_onnx(folder):
    return load_backend("onnx").open_engine(folder, threads=1)


@pytest.fixture(scope="session")
def pixels():
    """Two normalized 336x336 'images' [2, 3, 336, 336] (values like CLIP inputs)."""
    return np.random.default_rng(0).standard_normal((2, 3, 336, 336)).astype(np.float32)


def prompt_segments(engine, features, question="What abnormality is seen in this chest X-ray?"):
    """The upstream prompt for len(features) images, as prefill segments."""
    turns = [Turn(question=question, n_images=len(features))]
    return build_segments(turns, engine.tokenize, list(features))
