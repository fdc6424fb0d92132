"""ONNX exports only this folder's tests use, each done once per session.

The quantized folders come from export_onnx(quant=...) as the CLI makes them: embed and decoder
streamed and quantized per tensor (onnx/stream.py). The graph quantizer route (quantize_onnx from
the fp32 folder) is held to them in test_onnx_stream.py."""
from __future__ import annotations

import numpy as np
import pytest

from support.engines import export_onnx_once as _export


@pytest.fixture(scope="session")
def onnx_34b(tiny_34b, tmp_path_factory):
    """The 34B (llama/Yi, SentencePiece) export uses the >2 GB layout: every graph's
    weights in a .data file, so the fp32 checks also prove that layout loads."""
    return _export(tiny_34b, tmp_path_factory, "34b-fp32-external", quant="fp32", force_external_data=True)


@pytest.fixture(scope="session")
def onnx_7b_int8(tiny_7b, tmp_path_factory):
    return _export(tiny_7b, tmp_path_factory, "7b-int8", quant="int8", vision_quant="int8")


@pytest.fixture(scope="session")
def onnx_7b_int4(tiny_7b, tmp_path_factory):
    """int4 as onnxruntime's default quantizer makes it (the graph route's bytes, test_onnx_files);
    the k_quant/mixed default and the other algorithms: test_onnx_int4_algorithms.py."""
    return _export(tiny_7b, tmp_path_factory, "7b-int4", quant="int4", algorithm="default", symmetric=True,
                   keep_int8="none", embed_quant="int4")


@pytest.fixture(scope="session")
def onnx_7b_fp16(tiny_7b, tmp_path_factory):
    return _export(tiny_7b, tmp_path_factory, "7b-fp16", quant="fp16")


@pytest.fixture(scope="session")
def ref_7b(torch_7b):
    """The torch reference engine (one per session, shared with the GGUF tests)."""
    return torch_7b


@pytest.fixture(scope="session")
def ref_34b(torch_34b):
    return torch_34b


@pytest.fixture(scope="session")
def pixels():
    """Two normalized 336x336 'images' [2, 3, 336, 336] (values like CLIP inputs)."""
    return np.random.default_rng(0).standard_normal((2, 3, 336, 336)).astype(np.float32)
