"""Every row of the bad-input table (docs/bad-input.md) through the CLI: one clear
sentence, the right exit code, no traceback, no partial file left behind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures_gguf import gguf_7b_f16  # noqa: F401
from fixtures_onnx import onnx_7b  # noqa: F401
from huatuo_lite.cli import cli
from test_image import BAD_FILES

EXAMPLE = str(Path(__file__).resolve().parents[1] / "models" / "examples" / "chest_xray.png")
GREEDY = ["--temperature", "0", "--max-tokens", "4", "-q"]


def run(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def one_sentence(result, code=1, *words):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    last = [l for l in result.output.strip().splitlines() if l.strip()][-1]
    assert last.startswith("Error:") and last.endswith("."), last
    for word in words:
        assert word.lower() in last.lower(), last
    return last


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_image_files(case, tiny_7b, tmp_path):
    make, expected = BAD_FILES[case]
    one_sentence(run("ask", "-m", tiny_7b, *GREEDY, make(tmp_path), "Q?"), 1, expected)


def test_question_overflowing_the_context_says_by_how_much(tiny_7b):
    last = one_sentence(run("ask", "-m", tiny_7b, *GREEDY, EXAMPLE, "lung " * 5000), 1, "context", "too many")
    assert any(ch.isdigit() for ch in last)


def test_max_tokens_overflowing_the_context(tiny_7b):
    one_sentence(run("ask", "-m", tiny_7b, "--max-tokens", "4000", "-q", EXAMPLE, "Q?"), 1, "--max-tokens")


def _copy(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _role(folder, role):
    manifest = json.loads((folder / "manifest.json").read_text())
    return [folder / n for n, e in manifest["files"].items() if e["role"] == role][0]


def test_gguf_folder_without_manifest(gguf_7b_f16, tmp_path):
    folder = _copy(gguf_7b_f16, tmp_path)
    (folder / "manifest.json").unlink()
    one_sentence(run("ask", "-m", folder, *GREEDY, "Q?"), 1, "manifest.json")


def test_truncated_gguf(gguf_7b_f16, tmp_path):
    folder = _copy(gguf_7b_f16, tmp_path)
    text = _role(folder, "text")
    text.write_bytes(text.read_bytes()[:4096])
    one_sentence(run("ask", "-m", folder, *GREEDY, "Q?"), 1, text.name, "truncated")


def test_mismatched_mmproj(gguf_7b_f16, tmp_path):
    from huatuo_lite.convert.gguf_export import export_gguf
    from huatuo_lite.convert.tiny import make_tiny

    wide = make_tiny(tmp_path / "wide", variant="7b", hidden_size=512, num_heads=8)
    other = tmp_path / "wide-gguf"
    export_gguf(wide, other, quant="F16", vision_onnx=False)
    folder = _copy(gguf_7b_f16, tmp_path)
    mine = _role(folder, "mmproj")
    shutil.copyfile(_role(other, "mmproj"), mine)
    one_sentence(run("ask", "-m", folder, *GREEDY, "Q?"), 1, mine.name)


def test_truncated_and_missing_onnx_graph(onnx_7b, tmp_path):
    folder = _copy(onnx_7b, tmp_path)
    decoder = folder / "decoder.onnx"
    decoder.write_bytes(decoder.read_bytes()[:1000])
    one_sentence(run("ask", "-m", folder, *GREEDY, "Q?"), 1, "decoder.onnx")
    decoder.unlink()
    one_sentence(run("ask", "-m", folder, *GREEDY, "Q?"), 1, "decoder.onnx", "missing")


def test_pickle_only_checkpoint_is_refused(tiny_7b, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_7b / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    one_sentence(run("ask", "-m", folder, "--backend", "torch", *GREEDY, "Q?"), 1, "allow-pickle")
    out = tmp_path / "out"
    one_sentence(run("convert", "gguf", folder, out, "--quant", "F32"), 1, "allow-pickle")
    assert not out.exists() or not any(out.iterdir())


def test_unwritable_output_folder(tiny_7b, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_sentence(run("convert", "gguf", tiny_7b, blocker / "out", "--quant", "F32"), 1, "output folder")
    one_sentence(run("convert", "onnx", tiny_7b, blocker / "out", "--quant", "fp32"), 1, "output folder")


def test_interrupted_conversion_leaves_nothing(tiny_7b, tmp_path, monkeypatch):
    import huatuo_lite.convert.gguf_export as gguf_export

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_export, "write_mmproj", interrupt)   # after the text GGUF is written
    out = tmp_path / "out"
    result = run("convert", "gguf", tiny_7b, out, "--quant", "F32")
    assert result.exit_code == 130
    assert not out.exists() or [p.name for p in out.iterdir()] == []


def test_unknown_backend_and_bad_options(tiny_7b):
    assert run("ask", "-m", tiny_7b, "--backend", "tflite", EXAMPLE, "Q?").exit_code == 2
    assert run("ask", "-m", tiny_7b, "--temperature", "-1", EXAMPLE, "Q?").exit_code == 2
    assert run("convert", "gguf", tiny_7b, "out", "--quant", "Q3_XXS").exit_code == 2
