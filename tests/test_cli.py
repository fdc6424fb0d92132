"""The CLI end to end on tiny checkpoints: ask, the default command, --json, and
one clear sentence + the right exit code for bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from huatuo_lite.cli import cli

EXAMPLE = str(Path(__file__).resolve().parents[1] / "models" / "examples" / "chest_xray.png")
GREEDY = ["--temperature", "0", "--max-tokens", "6", "-q"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_sentence_error(result, code=1, *words):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("Error:"), result.output
    for word in words:
        assert word.lower() in lines[-1].lower(), lines[-1]


def test_runtime_import_is_torch_free():
    code = "import sys, huatuo_lite, huatuo_lite.cli, huatuo_lite.api; " \
           "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("command", [[], ["ask"], ["chat"], ["convert"], ["convert", "tiny"], ["convert", "gguf"],
                                     ["convert", "onnx"], ["models"], ["models", "list"], ["models", "verify"]])
def test_help_everywhere(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and "huatuo-lite" in result.output


def test_ask_json_greedy(tiny_7b):
    result = invoke("ask", "-m", tiny_7b, "--backend", "torch", "--json", *GREEDY, EXAMPLE, "Is there a nodule?")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["backend"] == "torch"
    assert 0 < data["completion_tokens"] <= 6
    assert data["prompt_tokens"] > 576                 # one image is 576 positions
    assert {"prefill_s", "decode_s", "image_encode_s"} <= set(data["timings"])
    assert isinstance(data["answer"], str)


def test_default_command_is_ask_and_greedy_is_deterministic(tiny_7b):
    first = invoke("-m", tiny_7b, *GREEDY, EXAMPLE, "Describe the image.")
    second = invoke("ask", "-m", tiny_7b, "--backend", "torch", *GREEDY, EXAMPLE, "Describe the image.")
    assert first.exit_code == 0, first.output
    assert first.output == second.output


def test_attachments_and_text_only(tiny_7b):
    result = invoke("ask", "-m", tiny_7b, "-a", EXAMPLE, "-a", EXAMPLE, "--json", *GREEDY, "Compare them.")
    assert json.loads(result.output)["prompt_tokens"] > 2 * 576
    result = invoke("ask", "-m", tiny_7b, "--json", *GREEDY, "What is a pneumothorax?")
    assert json.loads(result.output)["prompt_tokens"] < 576


def test_stdin_image(tiny_7b):
    data = Path(EXAMPLE).read_bytes()
    result = CliRunner().invoke(cli, ["ask", "-m", str(tiny_7b), "--json", *GREEDY, "-", "What?"], input=data)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["prompt_tokens"] > 576


# ------------------------------------------------------------------ bad input
def test_missing_image(tiny_7b, tmp_path):
    assert_one_sentence_error(invoke("ask", "-m", tiny_7b, *GREEDY, tmp_path / "nope.png", "Q?"), 1, "nope.png")


def test_too_many_images(tiny_7b):
    result = invoke("ask", "-m", tiny_7b, *GREEDY, *[EXAMPLE] * 7, "Q?")
    assert_one_sentence_error(result, 1, "6")


def test_empty_question(tiny_7b):
    assert_one_sentence_error(invoke("ask", "-m", tiny_7b, *GREEDY, EXAMPLE, "   "), 1)


def test_no_model_given(monkeypatch, tmp_path):
    import huatuo_lite.store as store

    monkeypatch.setenv("HUATUO_LITE_HOME", str(tmp_path))
    monkeypatch.delenv("HUATUO_LITE_MODEL", raising=False)
    monkeypatch.setattr(store, "demo_model", lambda: None)     # as in an install without the demo
    assert_one_sentence_error(invoke("ask", "-q", EXAMPLE, "Q?"), 1, "model")


def test_unknown_backend_is_a_usage_error(tiny_7b):
    result = invoke("ask", "-m", tiny_7b, "--backend", "tensorflow", EXAMPLE, "Q?")
    assert result.exit_code == 2 and "tensorflow" in result.output


def test_not_a_model_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    assert_one_sentence_error(invoke("ask", "-m", tmp_path, *GREEDY, EXAMPLE, "Q?"), 1, "not a model folder")


def test_backend_that_cannot_run_the_folder(tiny_7b):
    result = invoke("ask", "-m", tiny_7b, "--backend", "gguf", *GREEDY, EXAMPLE, "Q?")
    assert_one_sentence_error(result, 1, "convert")


def _broken_copy(src, tmp_path, edit):
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _drop_projector(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "mm_projector" not in k}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


MALFORMED = {
    "missing shard": (lambda d: sorted(d.glob("model-*.safetensors"))[-1].unlink(), "missing"),
    "missing projector": (_drop_projector, "projector"),
    "unknown architecture": (lambda d: _edit_config(d, architectures=["MistralForCausalLM"], model_type="mistral"),
                             "MistralForCausalLM"),
    "mismatched mm_hidden_size": (lambda d: _edit_config(d, mm_hidden_size=999), "mm_hidden_size"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_folders(case, tiny_7b, tmp_path):
    edit, word = MALFORMED[case]
    folder = _broken_copy(tiny_7b, tmp_path, edit)
    assert_one_sentence_error(invoke("ask", "-m", folder, "--backend", "torch", *GREEDY, EXAMPLE, "Q?"), 1, word)


def test_ctrl_c_exits_130(monkeypatch, tiny_7b):
    import huatuo_lite.api as api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "load", interrupted)
    result = CliRunner().invoke(cli, ["ask", "-m", str(tiny_7b), EXAMPLE, "Q?"])
    assert result.exit_code == 130


def test_default_model_from_the_environment(tiny_7b, monkeypatch, tmp_path):
    monkeypatch.setenv("HUATUO_LITE_HOME", str(tmp_path / "empty-store"))
    monkeypatch.setenv("HUATUO_LITE_MODEL", str(tiny_7b))
    result = invoke("ask", "--json", *GREEDY, EXAMPLE, "Q?")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["model"] == str(tiny_7b)


def test_several_installed_models_need_a_choice(monkeypatch, tmp_path):
    for name in ("a", "b"):
        (tmp_path / "models" / name).mkdir(parents=True)
    monkeypatch.setenv("HUATUO_LITE_HOME", str(tmp_path))
    monkeypatch.delenv("HUATUO_LITE_MODEL", raising=False)
    assert_one_sentence_error(invoke("ask", "-q", EXAMPLE, "Q?"), 1, "--model")
