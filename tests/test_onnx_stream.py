"""The streamed text export (onnx_stream + onnx_builder, what the CLI uses) against
the two routes it replaces: onnxruntime's graph quantizer run on the whole fp32
graph (quantize_onnx), and the torch module exported by torch.onnx (onnx_text)."""
from __future__ import annotations

import numpy as np
import pytest

from fixtures_onnx import *  # noqa: F401,F403
from fixtures_onnx import open_onnx, prompt_segments

QUANT_SUFFIXES = ("_Q4", "_Q8", "_scales")


def _weights(path) -> dict:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("quant_fixture,options", [("onnx_7b_int4", {}), ("onnx_7b_int8", {"vision_quant": "int8"})])
def test_streamed_quantization_is_the_graph_quantizers(quant_fixture, options, onnx_7b, pixels, request, tmp_path):
    """Per-tensor packing gives byte-identical MatMulNBits / GatherBlockQuantized
    weights and scales, and the same logits, as quantizing the whole fp32 graph."""
    from huatuo_lite.convert.onnx_export import quantize_onnx

    streamed = request.getfixturevalue(quant_fixture)
    quant = quant_fixture.rsplit("_", 1)[-1]
    quantize_onnx(onnx_7b, tmp_path, quant=quant, **options)
    for graph in ("decoder.onnx", "embed.onnx"):
        mine, theirs = _weights(streamed / graph), _weights(tmp_path / graph)
        packed = sorted(n for n in theirs if n.endswith(QUANT_SUFFIXES))
        assert packed == sorted(n for n in mine if n.endswith(QUANT_SUFFIXES))
        for name in packed:
            np.testing.assert_array_equal(mine[name], theirs[name], err_msg=name)
    if quant == "int4":
        assert any(n.endswith("_Q4") for n in _weights(streamed / "embed.onnx"))
    a, b = open_onnx(streamed), open_onnx(tmp_path)
    segments = prompt_segments(a, a.encode_images(pixels[:1]))
    np.testing.assert_allclose(a.prefill(segments, all_logits=True), b.prefill(segments, all_logits=True),
                               rtol=0, atol=1e-5)


def test_streamed_decoder_equals_torch_module_export(tiny_34b, onnx_34b, tmp_path):
    """llama/Yi (no q/k/v bias, SentencePiece, forced external data): the
    hand-built graph and onnx_text's torch module exported by TorchScript agree."""
    from huatuo_lite.backends.vision_onnx import make_session
    from huatuo_lite.convert.checkpoint import open_checkpoint
    from huatuo_lite.convert.onnx_text import decoder_example, export_decoder

    ckpt = open_checkpoint(tiny_34b)
    export_decoder(ckpt, tmp_path / "decoder.onnx")
    torch_graph, streamed = make_session(tmp_path / "decoder.onnx", 1), make_session(onnx_34b / "decoder.onnx", 1)
    assert [i.name for i in streamed.get_inputs()] == [i.name for i in torch_graph.get_inputs()]
    assert [o.name for o in streamed.get_outputs()] == [o.name for o in torch_graph.get_outputs()]
    example = decoder_example(ckpt.text, batch=2, length=4, past=3)
    feeds = {i.name: t.numpy() for i, t in zip(streamed.get_inputs(), example)}
    for got, want in zip(streamed.run(None, feeds), torch_graph.run(None, feeds)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_small_graphs_are_inlined_unless_forced(onnx_7b, onnx_34b):
    """The tiny 7B's graphs are single files; the forced 34B keeps .data files whose
    tensors are page-aligned (offsets are multiples of 4096)."""
    import onnx

    assert not any(p.name.endswith(".data") for p in onnx_7b.iterdir())
    model = onnx.load(str(onnx_34b / "decoder.onnx"), load_external_data=False)
    offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
    assert len(offsets) > 10 and all(o % 4096 == 0 for o in offsets)
