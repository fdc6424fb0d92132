"""ONNX model folders: valid graphs, the >2 GB external-data layout, the
manifest, and one clear sentence for missing, truncated or corrupt files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from support.engines import open_onnx, prompt_segments, skip_without
skip_without('torch', 'onnx', 'onnxruntime')

from huatuo_lite.errors import HuatuoError, ModelFormatError

FOLDERS = ["onnx_7b", "onnx_34b", "onnx_7b_int8", "onnx_7b_int4", "onnx_7b_fp16"]
GRAPHS = ("vision.onnx", "embed.onnx", "decoder.onnx")


def one_sentence(message: str) -> bool:
    return message.count("\n") == 0 and message.rstrip().endswith(".")


@pytest.mark.parametrize("folder_fixture", FOLDERS)
def test_every_graph_passes_the_onnx_checker(folder_fixture, request):
    import onnx

    folder = request.getfixturevalue(folder_fixture)
    for name in GRAPHS:
        onnx.checker.check_model(str(folder / name))     # a path: works with external data
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_manifest_describes_the_folder(onnx_7b, ref_7b):
    from huatuo_lite.manifest import read_manifest, verify_hashes

    manifest = read_manifest(onnx_7b)
    assert manifest["format"] == "onnx"
    roles = {name: entry["role"] for name, entry in manifest["files"].items()}
    assert {roles[g] for g in GRAPHS} == {"vision", "embed", "decoder"}
    assert roles["tokenizer.json"] == "tokenizer"
    text = manifest["text"]
    assert (text["n_embd"], text["n_vocab"], text["n_ctx"]) == (
        ref_7b.hidden_size, ref_7b.checkpoint.text.vocab_size, ref_7b.n_ctx)
    assert set(text["eos_token_ids"]) == set(ref_7b.eos_token_ids)
    assert len(manifest["source"]["config_sha256"]) == 64
    assert manifest["tools"]["onnxruntime"] and manifest["tools"]["torch"]
    assert verify_hashes(onnx_7b, manifest) == []


def test_external_data_layout(onnx_34b, onnx_7b, onnx_7b_int4, pixels, tmp_path):
    """Forced >2 GB layout: weights in <graph>.onnx.data, recorded as role "data";
    the fp32 34B comparison tests run on this folder. A forced int4 re-layout of
    the 7B gives the same logits as the plain int4 folder."""
    manifest = json.loads((onnx_34b / "manifest.json").read_text())
    for name in GRAPHS:
        assert (onnx_34b / f"{name}.data").stat().st_size > (onnx_34b / name).stat().st_size
        assert manifest["files"][f"{name}.data"]["role"] == "data"
    from huatuo_lite.convert.onnx.export import quantize_onnx

    quantize_onnx(onnx_7b, tmp_path, quant="int4", force_external_data=True)
    assert all((tmp_path / f"{name}.data").is_file() for name in GRAPHS)
    forced, plain = open_onnx(tmp_path), open_onnx(onnx_7b_int4)
    segments = prompt_segments(plain, plain.encode_images(pixels[:1]))
    np.testing.assert_array_equal(forced.prefill(segments), plain.prefill(segments))


def _copy(folder, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(folder, dest)
    return dest


def _reset_size(folder, name):
    """Make the manifest agree with a damaged file, so the loader itself must notice."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"][name]["size"] = (folder / name).stat().st_size
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", GRAPHS)
def test_missing_graph_is_one_sentence(name, onnx_7b, tmp_path):
    folder = _copy(onnx_7b, tmp_path)
    (folder / name).unlink()
    with pytest.raises(ModelFormatError) as err:
        open_onnx(folder)
    assert name in str(err.value) and "missing" in str(err.value) and one_sentence(str(err.value))


@pytest.mark.parametrize("name", ["decoder.onnx", "vision.onnx", "decoder.onnx.data"])
def test_truncated_graph_is_one_sentence(name, onnx_7b, onnx_34b, pixels, tmp_path):
    folder = _copy(onnx_34b if name.endswith(".data") else onnx_7b, tmp_path)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError) as err:              # caught by the manifest's sizes
        open_onnx(folder)
    assert name in str(err.value) and "truncated" in str(err.value) and one_sentence(str(err.value))
    _reset_size(folder, name)
    with pytest.raises(ModelFormatError) as err:              # caught by onnxruntime's loader
        # vision.onnx is opened at the first image (a question answered from the disk cache
        # never pays its session), so its damage is refused there, with the same sentence
        engine = open_onnx(folder)
        engine.encode_images(pixels[:1])
    assert name.removesuffix(".data") in str(err.value) and one_sentence(str(err.value))


def test_corrupt_vision_graph_for_the_gguf_backend(tmp_path):
    from huatuo_lite.backends.vision_onnx import OnnxVisionEncoder

    bad = tmp_path / "vision.onnx"
    bad.write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(ModelFormatError) as err:
        OnnxVisionEncoder(bad)
    assert "vision.onnx" in str(err.value) and one_sentence(str(err.value))
    with pytest.raises(ModelFormatError):
        OnnxVisionEncoder(tmp_path / "absent.onnx")


def test_wrong_folder_kinds_are_refused(onnx_7b_int4, tiny_7b, tmp_path):
    folder = _copy(onnx_7b_int4, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": "gguf"}))
    with pytest.raises(ModelFormatError, match="not an ONNX one"):
        open_onnx(folder)
    with pytest.raises(ModelFormatError, match="manifest.json"):
        open_onnx(tiny_7b)                                   # an upstream folder, not converted
    from huatuo_lite.convert.onnx.export import export_onnx, quantize_onnx

    with pytest.raises(HuatuoError, match="not an fp32 ONNX export"):
        quantize_onnx(onnx_7b_int4, tmp_path / "again", quant="int8")
    with pytest.raises(HuatuoError, match="--quant"):
        export_onnx(tiny_7b, tmp_path / "x", quant="int3")
    with pytest.raises(HuatuoError, match="--vision-quant"):
        export_onnx(tiny_7b, tmp_path / "x", vision_quant="int4")


def test_sentencepiece_only_source_gets_a_tokenizer_json(tiny_34b, ref_34b, tmp_path):
    """Upstream folders may ship only tokenizer.model: the export makes
    tokenizer.json with transformers' converter, and it tokenizes as the reference."""
    from huatuo_lite.backends.onnx import TokenizerFile
    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.onnx.export import copy_tokenizer

    src = tmp_path / "src"
    shutil.copytree(tiny_34b, src)
    (src / "tokenizer.json").unlink()
    out = tmp_path / "out"
    out.mkdir()
    names = {p.name for p in copy_tokenizer(open_checkpoint(src), out)}
    assert "tokenizer.json" in names and "tokenizer.model" in names
    tok = TokenizerFile(out / "tokenizer.json")
    for text in ("<|user|>\n<image>\n请描述这张腹部CT图像。\n<|assistant|>\n", "  two  spaces\tand tab"):
        assert tok.encode(text) == ref_34b.tokenize(text)


def test_onnx_runtime_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = ("import sys, huatuo_lite.backends.onnx, huatuo_lite.backends.vision_onnx; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bad_engine_calls_are_prompt_errors(onnx_7b_int4):
    from huatuo_lite.errors import PromptError

    engine = open_onnx(onnx_7b_int4)
    with pytest.raises(PromptError, match="prefill"):
        engine.step(1)
    with pytest.raises(PromptError, match="empty"):
        engine.prefill([[]])
    with pytest.raises(PromptError, match="Token ids"):
        engine.prefill([[engine.vocab_rows]])
    with pytest.raises(PromptError, match="context"):
        engine.prefill([[1] * (engine.n_ctx + 1)])
    with pytest.raises(PromptError, match="prefill"):      # the failed prefill left no cache
        engine.step(1)
    assert engine.token_bytes(-1) == b"" and engine.token_bytes(engine.vocab_rows) == b""


def test_dynamo_exporter_gives_the_same_decoder(tiny_7b, onnx_7b, tmp_path):
    """The optional dynamo exporter writes a decoder equal to the default one's."""
    from huatuo_lite.backends.vision_onnx import make_session
    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from support.torch_decoder import decoder_example, export_decoder

    ckpt = open_checkpoint(tiny_7b)
    export_decoder(ckpt, tmp_path / "decoder.onnx", exporter="dynamo")
    dynamo, default = make_session(tmp_path / "decoder.onnx", 1), make_session(onnx_7b / "decoder.onnx", 1)
    example = decoder_example(ckpt.text, batch=1, length=4, past=3)
    feeds = {i.name: t.numpy() for i, t in zip(default.get_inputs(), example)}
    for got, want in zip(dynamo.run(None, feeds), default.run(None, feeds)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
