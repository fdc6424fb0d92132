"""Every row of the bad-input table (docs/bad-input.md) through the CLI: one clear
sentence, the right exit code, no traceback, no partial file left behind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from support.engines import skip_without
skip_without('torch', 'gguf', 'llama_cpp', 'onnx', 'onnxruntime')

from huatuo_lite.cli.main import cli
from support.bad_images import BAD_FILES

EXAMPLE = str(Path(__file__).resolve().parents[2] / "models" / "examples" / "chest_xray.png")
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
    from huatuo_lite.convert.gguf.export import export_gguf
    from huatuo_lite.convert.tiny.make import make_tiny

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
    import huatuo_lite.convert.gguf.export as gguf_export

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


# ------------------------------------------------- files and entry points ----
def test_manifest_that_is_a_list_or_lacks_files(gguf_7b_f16, tmp_path):
    folder = _copy(gguf_7b_f16, tmp_path)
    (folder / "manifest.json").write_text("[]")
    one_sentence(run("ask", "-m", folder, *GREEDY, "Q?"), 1, "manifest.json")
    (folder / "manifest.json").write_text(json.dumps({"format": "gguf"}))
    one_sentence(run("ask", "-m", folder, *GREEDY, "Q?"), 1, "manifest.json", "files")
    one_sentence(run("models", "verify", folder), 1, "files")


def test_batch_records_with_numbers_for_image_or_conversations(tiny_7b, tmp_path):
    data = tmp_path / "data.json"
    for record, field in (({"image": 5, "question": "Q?"}, "image"), ({"conversations": 3}, "conversations")):
        data.write_text(json.dumps([record]))
        one_sentence(run("batch", data, "-m", tiny_7b, "-o", tmp_path / "o.jsonl"), 1, "record 0", field)


def test_hand_edited_batch_results_and_run_file(tiny_7b, tmp_path):
    data, out = tmp_path / "data.json", tmp_path / "o.jsonl"
    data.write_text(json.dumps([{"question": "Q?"}]))
    args = ("batch", data, "-m", tiny_7b, "-b", "torch", "--threads", "1", "-o", out, "--max-tokens", "1",
            "--no-progress")
    assert run(*args).exit_code == 0
    out.write_text("5\n")
    one_sentence(run(*args), 1, "Line 1", "result row")
    out.write_text('{"index": "zero", "key": 1}\n')
    one_sentence(run(*args), 1, "Line 1")
    out.write_text("")
    (tmp_path / "o.jsonl.run.json").write_text("[1, 2]")
    one_sentence(run(*args), 1, "run.json", "delete")


class CallsPrint:
    """Unpickles by calling print: what weights-only loading must refuse."""

    def __reduce__(self):
        return (print, ("this ran while unpickling",))


def test_pickle_holding_other_objects_is_refused_with_allow_pickle(tiny_7b, tmp_path):
    import torch

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_7b / "config.json", folder / "config.json")
    torch.save({"model.embed_tokens.weight": CallsPrint()}, folder / "pytorch_model.bin")
    out = tmp_path / "out"
    one_sentence(run("convert", "gguf", folder, out, "--quant", "F32", "--allow-pickle"), 1,
                 "pytorch_model.bin", "objects other than tensors")
    torch.save({"model.embed_tokens.weight": 3}, folder / "pytorch_model.bin")
    one_sentence(run("convert", "gguf", folder, out, "--quant", "F32", "--allow-pickle"), 1, "state dict")
    assert not out.exists() or not any(out.iterdir())


def test_models_rm_on_a_symlinked_entry_keeps_the_target(tmp_path, monkeypatch):
    monkeypatch.setenv("HUATUO_LITE_HOME", str(tmp_path / "home"))
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (tmp_path / "home" / "models").mkdir(parents=True)
    (tmp_path / "home" / "models" / "linked").symlink_to(target)
    result = run("models", "rm", "linked", "--yes")
    assert result.exit_code == 0 and "link" in result.output, result.output
    assert (target / "config.json").is_file() and not (tmp_path / "home" / "models" / "linked").exists()


def test_models_pull_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HUATUO_LITE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")     # nothing listens there: no network
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    last = one_sentence(run("models", "pull", "huatuogpt-vision-7b"), 1, "Hugging Face Hub", "HF_HUB_OFFLINE")
    assert "by hand" in last
    assert not (tmp_path / "home" / "models" / "huatuogpt-vision-7b").exists()     # nothing half-pulled listed


def test_fifo_given_as_model_file_or_data(gguf_7b_f16, tiny_7b, tmp_path):
    import os

    folder = _copy(gguf_7b_f16, tmp_path)
    text = _role(folder, "text")
    text.unlink()
    os.mkfifo(text)
    one_sentence(run("ask", "-m", folder, *GREEDY, "Q?"), 1, text.name, "regular file")
    (folder / "manifest.json").unlink()
    os.mkfifo(folder / "manifest.json")
    one_sentence(run("ask", "-m", folder, *GREEDY, "Q?"), 1, "manifest.json")
    fifo = tmp_path / "data.json"
    os.mkfifo(fifo)
    one_sentence(run("batch", fifo, "-m", tiny_7b, "-o", tmp_path / "o.jsonl"), 1, "regular file")
