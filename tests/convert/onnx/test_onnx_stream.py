"""The streamed export (onnx_stream + onnx_builder + onnx_vision_stream, what the
CLI uses) against the routes it replaces: onnxruntime's graph quantizer run on
the whole fp32 graph (quantize_onnx), and torch modules exported by torch.onnx
(tests/support/torch_decoder.py, convert/onnx/vision.py)."""
from __future__ import annotations

import numpy as np
import pytest

from support.engines import open_onnx, prompt_segments, skip_without
skip_without('torch', 'onnx', 'onnxruntime')


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
    from huatuo_lite.convert.onnx.export import quantize_onnx

    streamed = request.getfixturevalue(quant_fixture)
    quant = quant_fixture.rsplit("_", 1)[-1]
    quantize_onnx(onnx_7b, tmp_path, quant=quant, **options)
    for graph in ("decoder.onnx", "embed.onnx", "vision.onnx"):
        mine, theirs = _weights(streamed / graph), _weights(tmp_path / graph)
        packed = sorted(n for n in theirs if n.endswith(QUANT_SUFFIXES))
        assert packed == sorted(n for n in mine if n.endswith(QUANT_SUFFIXES))
        for name in packed:
            np.testing.assert_array_equal(mine[name], theirs[name], err_msg=name)
    if quant == "int4":
        assert any(n.endswith("_Q4") for n in _weights(streamed / "embed.onnx"))
    else:                                       # --vision-quant int8: MatMulNBits in vision.onnx too
        assert any(n.endswith("_Q8") for n in _weights(streamed / "vision.onnx"))
    a, b = open_onnx(streamed), open_onnx(tmp_path)
    segments = prompt_segments(a, a.encode_images(pixels[:1]))
    np.testing.assert_allclose(a.prefill(segments, all_logits=True), b.prefill(segments, all_logits=True),
                               rtol=0, atol=1e-5)


def test_streamed_decoder_equals_torch_module_export(tiny_34b, onnx_34b, tmp_path):
    """llama/Yi (no q/k/v bias, SentencePiece, forced external data): the
    hand-built graph and torch_decoder.py's torch module exported by TorchScript agree."""
    from huatuo_lite.backends.vision_onnx import make_session
    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from support.torch_decoder import decoder_example, export_decoder

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


def _tied_copy(src, dest):
    """src with lm_head.weight removed and tie_word_embeddings set (like Qwen2-0.5B)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    index_path = dest / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = dest / index["weight_map"].pop("lm_head.weight")
    tensors = load_file(str(shard))
    del tensors["lm_head.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return dest


def test_tied_lm_head_streams_the_embedding(tiny_7b, tmp_path):
    """No lm_head.weight: the decoder's output projection is the embedding table,
    read once more after the layer pass; logits equal the torch module's."""
    import torch

    from huatuo_lite.backends.vision_onnx import make_session
    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.onnx.stream import export_decoder_streamed
    from support.torch_decoder import build_decoder, decoder_example

    ckpt = open_checkpoint(_tied_copy(tiny_7b, tmp_path / "tied"))
    assert "lm_head.weight" not in ckpt.names() and ckpt.text.tie_word_embeddings
    export_decoder_streamed(ckpt, tmp_path / "decoder.onnx")
    session = make_session(tmp_path / "decoder.onnx", 1)
    example = decoder_example(ckpt.text, batch=2, length=3, past=2)
    got = session.run(["logits"], {i.name: t.numpy() for i, t in zip(session.get_inputs(), example)})[0]
    with torch.no_grad():
        want = build_decoder(ckpt)(*example)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_torch_vision_route_still_matches(tiny_7b, onnx_7b, pixels, tmp_path):
    """export_onnx(exporter="torchscript") keeps the torch.onnx vision route; its
    image features equal the streamed vision graph's."""
    from huatuo_lite.convert.onnx.export import export_onnx

    export_onnx(tiny_7b, tmp_path, quant="fp32", exporter="torchscript")
    got, want = open_onnx(tmp_path).encode_images(pixels), open_onnx(onnx_7b).encode_images(pixels)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
