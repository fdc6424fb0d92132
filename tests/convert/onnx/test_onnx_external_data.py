"""save_graph puts weights past INLINE_BYTES in `<name>.data` (onnxruntime maps that file; weights
inside the protobuf are parsed and copied: the small profile's int8 decoder opened in 0.50-0.55 s
external against 0.96-1.31 s inline) and keeps small graphs in one file."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from huatuo_lite.convert.onnx.graph import INLINE_BYTES, external_data_path, save_graph  # noqa: E402


def matmul_model(rows: int):
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((rows, 256), 0.5, np.float32), "w")   # [rows, 256] float32
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("rows, external", [(64, False), (INLINE_BYTES // 1024 + 64, True)])
def test_weights_past_the_inline_limit_go_to_a_data_file(tmp_path, rows, external):
    path = tmp_path / "decoder.onnx"
    files = save_graph(matmul_model(rows), path)
    assert external_data_path(path).exists() == external
    if external:   # readable as the graph is (onnx itself creates the .data file 0600)
        assert external_data_path(path).stat().st_mode & 0o777 == path.stat().st_mode & 0o777
    assert sorted(f.name for f in files) == sorted(["decoder.onnx"] + (["decoder.onnx.data"] if external else []))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.ones((1, rows), np.float32)})
    assert np.allclose(y, 0.5 * rows)
