"""vision.onnx in fp16 / int8 against fp32 (issue #19 item 4): the per-token fidelity gate on
the tiny checkpoints, its fallback to fp32, what `convert gguf --vision-dtype` records, and the
answers through a GGUF folder with each vision graph."""
from __future__ import annotations

import json

import numpy as np
import pytest

from support.engines import skip_without
skip_without('torch', 'gguf', 'llama_cpp', 'onnx')

CANDIDATES = ("fp16", "int8")


@pytest.fixture(scope="module")
def graphs(tiny_7b, tmp_path_factory):
    """The tiny 7B's vision graph in each dtype: {dtype: path}."""
    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.onnx.vision_stream import export_vision_streamed

    ckpt, root = open_checkpoint(tiny_7b), tmp_path_factory.mktemp("vision-dtypes")
    paths = {}
    for dtype in ("fp32", *CANDIDATES):
        (root / dtype).mkdir()
        paths[dtype] = root / dtype / "vision.onnx"
        export_vision_streamed(ckpt, paths[dtype], dtype)
    return paths


def _size(tiny_7b):
    from huatuo_lite.convert.checkpoint.read import open_checkpoint

    return open_checkpoint(tiny_7b).vision.image_size


def _weight_types(path):
    import onnx

    model = onnx.load(str(path))
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer if len(t.dims) == 2}


@pytest.mark.parametrize("dtype", CANDIDATES)
def test_smaller_graphs_pass_the_gate_on_the_tiny_tower(graphs, dtype, tiny_7b):
    from huatuo_lite.convert.onnx.vision_dtype import GATE_COSINE, PROBES, gate

    record = gate(graphs["fp32"], graphs[dtype], dtype, _size(tiny_7b))
    print(dtype, record)
    assert record["passed"] and record["min_cosine"] >= GATE_COSINE
    assert record["probes"] == list(PROBES) and record["max_abs_diff"] > 0       # really another graph
    assert graphs[dtype].stat().st_size < 0.7 * graphs["fp32"].stat().st_size   # tiny: Conv, embeddings stay f32
    if dtype == "fp16":     # only the weight storage is rounded: f32 arithmetic
        assert record["min_cosine"] >= 0.99999
        assert "FLOAT16" in _weight_types(graphs[dtype])


def test_a_corrupted_graph_fails_the_gate(graphs, tiny_7b, tmp_path):
    """The gate can fail: the fp16 graph with one MatMul weight of the first layer replaced by noise."""
    import onnx
    from onnx import numpy_helper

    from huatuo_lite.convert.onnx.vision_dtype import gate

    model = onnx.load(str(graphs["fp16"]))
    init = next(t for t in model.graph.initializer if "layers.0.mlp.fc2" in t.name and len(t.dims) == 2)
    weights = numpy_helper.to_array(init)
    noise = np.random.default_rng(0).normal(0, float(weights.std()) * 3, weights.shape).astype(np.float16)
    init.CopyFrom(numpy_helper.from_array(noise, init.name))
    onnx.save(model, str(tmp_path / "vision.onnx"))
    record = gate(graphs["fp32"], tmp_path / "vision.onnx", "fp16", _size(tiny_7b))
    print(record)
    assert not record["passed"] and record["min_cosine"] < 0.999


def test_auto_falls_back_to_fp32_when_the_gate_fails(tiny_7b, graphs, tmp_path, capsys):
    """An unreachable threshold stands for a tower the candidate does not reproduce."""
    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.onnx.vision_dtype import AUTO_CANDIDATE, write_vision

    files, record = write_vision(open_checkpoint(tiny_7b), tmp_path, "vision.onnx", "auto", threshold=1.5)
    assert record["dtype"] == "fp32" and record["gate"]["candidate"] == AUTO_CANDIDATE
    assert record["gate"]["passed"] is False and record["gate"]["threshold"] == 1.5
    assert [p.name for p in files] == ["vision.onnx"]
    assert (tmp_path / "vision.onnx").read_bytes() == graphs["fp32"].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx"]            # no scratch left
    said = [line for line in capsys.readouterr().err.splitlines() if "stays fp32" in line]   # not tqdm's
    assert len(said) == 1 and said[0].startswith("vision.onnx stays fp32") and "(< 1.5)" in said[0]


@pytest.fixture(scope="module")
def folders(tiny_7b, tmp_path_factory):
    """The tiny 7B as Q8_0 GGUF folders: the default (auto) and each --vision-dtype."""
    from huatuo_lite.convert.gguf.export import export_gguf

    out = {}
    for dtype in ("auto", "fp32", "fp16"):
        out[dtype] = tmp_path_factory.mktemp(f"gguf-vision-{dtype}")
        export_gguf(tiny_7b, out[dtype], quant="Q8_0", threads=1, vision_dtype=dtype)
    return out


def test_auto_records_the_gate_in_the_manifest(folders):
    from huatuo_lite.convert.onnx.vision_dtype import AUTO_CANDIDATE, GATE_COSINE, PROBES

    manifest = json.loads((folders["auto"] / "manifest.json").read_text())
    record = manifest["vision_onnx"]
    assert record["dtype"] == AUTO_CANDIDATE and record["requested"] == "auto"
    gate = record["gate"]
    assert gate["passed"] and gate["min_cosine"] >= GATE_COSINE and gate["threshold"] == GATE_COSINE
    assert gate["probes"] == list(PROBES) and 0 < gate["max_abs_diff"] < 1
    vision = {n: e for n, e in manifest["files"].items() if n.startswith("vision.onnx")}
    assert vision and all(e["quant"] == AUTO_CANDIDATE for e in vision.values())
    assert not [p.name for p in folders["auto"].iterdir() if p.name.startswith(".")]   # staging gone
    fixed = json.loads((folders["fp16"] / "manifest.json").read_text())["vision_onnx"]
    assert fixed == {"dtype": "fp16", "requested": "fp16"}


def test_f32_text_keeps_the_exact_vision_graph(gguf_7b_f32):
    manifest = json.loads((gguf_7b_f32 / "manifest.json").read_text())
    assert manifest["vision_onnx"]["dtype"] == "fp32" and manifest["files"]["vision.onnx"]["quant"] == "fp32"


def test_fp16_vision_gives_the_same_greedy_answer(folders):
    """`ask` through the folder: token ids of fp16 (opened with the cast-weights plan) and of
    auto's int8 equal fp32's, for the example image and a random one."""
    from PIL import Image

    import huatuo_lite
    from huatuo_lite.backends.vision_onnx import CAST_WEIGHTS_PLAN, DEFAULT_PLAN, session_plan
    from huatuo_lite.convert.onnx.vision_dtype import EXAMPLE_IMAGE

    assert session_plan(folders["fp16"] / "vision.onnx") == CAST_WEIGHTS_PLAN
    assert session_plan(folders["fp32"] / "vision.onnx") == DEFAULT_PLAN
    noise = Image.fromarray(np.random.default_rng(5).integers(0, 256, (200, 260, 3), dtype=np.uint8))
    answers = {}
    for dtype in ("fp32", "fp16", "auto"):
        with huatuo_lite.load(folders[dtype], backend="gguf", threads=1) as model:
            answers[dtype] = [model.ask([image], "What is shown?", temperature=0.0, max_new_tokens=24).token_ids
                              for image in (EXAMPLE_IMAGE, noise)]
    assert all(len(ids) > 3 for ids in answers["fp32"])
    assert answers["fp16"] == answers["fp32"]
    assert answers["auto"] == answers["fp32"]


def test_vision_dtype_is_refused_for_qwen25vl(tmp_path):
    from huatuo_lite.convert.gguf.export import export_gguf
    from huatuo_lite.convert.tiny.make import make_tiny
    from huatuo_lite.errors import HuatuoError

    src = make_tiny(tmp_path / "qwen", variant="7b-qwen25vl")
    with pytest.raises(HuatuoError, match="--vision-dtype applies to LLaVA folders only"):
        export_gguf(src, tmp_path / "out", vision_dtype="fp16")
    assert not (tmp_path / "out").exists()


def test_cli_choices_are_the_converters():
    from huatuo_lite.cli.convert import VISION_DTYPES
    from huatuo_lite.convert.onnx import vision_dtype

    assert VISION_DTYPES == vision_dtype.VISION_DTYPES


def test_an_interrupt_during_the_gate_leaves_the_folder_as_it_was(folders, tiny_7b, tmp_path, monkeypatch):
    """Ctrl-C while auto compares the graphs: the earlier conversion's files are untouched and no
    staging or scratch folder is left (the candidate lives inside the staging folder)."""
    import shutil

    from huatuo_lite.convert.gguf.export import export_gguf
    from huatuo_lite.convert.onnx import vision_dtype

    out = tmp_path / "folder"
    shutil.copytree(folders["fp32"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vision_dtype, "gate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_7b, out, quant="Q8_0", threads=1, vision_dtype="auto")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
