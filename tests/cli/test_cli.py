"""The CLI end to end on tiny checkpoints: ask, the default command, --json, and
one clear sentence + the right exit code for bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from huatuo_lite.cli.main import cli

EXAMPLE = str(Path(__file__).resolve().parents[2] / "models" / "examples" / "chest_xray.png")
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
    code = "import sys, huatuo_lite, huatuo_lite.cli.main, huatuo_lite.api; " \
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
    assert data["usage"]["total_tokens"] == data["prompt_tokens"] + data["completion_tokens"]
    assert {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second",
            "prompt_per_second"} <= set(data["timings"])
    assert data["timings"]["predicted_n"] == data["completion_tokens"]


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


# ------------------------------------------------------------ #16 / #17 input checks
@pytest.fixture
def no_model_load(monkeypatch):
    """api.load that fails loudly: these inputs must be refused before any model loads."""
    import huatuo_lite.api as api

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(api, "load", refuse)


BAD_OPTIONS = [("--temperature", "nan"), ("--temperature", "1e-310"), ("--temperature", "inf"),
               ("--seed", "-1"), ("--top-p", "nan"), ("--top-p", "inf"), ("--repetition-penalty", "nan"),
               ("--repetition-penalty", "inf"), ("--top-k", "-1"), ("--max-tokens", "0"), ("--temperature", "warm")]


@pytest.mark.parametrize("option,value", BAD_OPTIONS)
def test_bad_generation_options_are_usage_errors(option, value, no_model_load):
    for command in ("ask", "chat"):
        args = [command, option, value] + ([EXAMPLE, "Q?"] if command == "ask" else [])
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert option in result.output and "Traceback" not in result.output


def test_question_that_is_not_utf8(no_model_load):
    question = b"\xff\xfe".decode("utf-8", "surrogateescape")      # as argv gives undecodable bytes
    assert_one_sentence_error(invoke("ask", "-q", EXAMPLE, question), 1, "not valid UTF-8")


def test_question_that_is_not_utf8_in_a_real_process():
    done = subprocess.run([sys.executable, "-m", "huatuo_lite.cli", "ask", "-q", "-m", "no-such-model", EXAMPLE,
                           b"\xff\xfe"], capture_output=True)
    assert done.returncode == 1 and b"Traceback" not in done.stderr
    assert b"not valid UTF-8" in done.stderr


def test_mistyped_command_is_a_usage_error(no_model_load):
    result = invoke("frobnicate", "x")
    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.output and "ask" in result.output and "convert" in result.output


def test_default_command_takes_images_questions_and_options(monkeypatch):
    import huatuo_lite.api as api

    for key in ("HUATUO_LITE_NO_NOTICE", "TQDM_DISABLE"):          # the group's -q sets them: undo after
        monkeypatch.setenv(key, os.environ.get(key, "")) if key in os.environ else monkeypatch.delenv(key, raising=False)
    from huatuo_lite.errors import HuatuoError

    seen = []

    def fake_load(model, **kwargs):
        seen.append(model)
        raise HuatuoError("stop here.")

    monkeypatch.setattr(api, "load", fake_load)
    for args in ([EXAMPLE, "What is shown?"], ["-m", "some-model", EXAMPLE, "Q?"], ["What is a pneumothorax?"],
                 ["-q", "-m", "some-model", "Q?"], ["lung" * 5000], ["lung " * 5000]):      # too long for a file name: a question
        result = invoke(*args)
        assert result.exit_code == 1 and "stop here." in result.output, (args, result.output)
    assert len(seen) == 6


@pytest.mark.parametrize("args", [["ask", EXAMPLE], [EXAMPLE], ["ask", "-"]])
def test_image_without_a_question_is_a_usage_error(args, no_model_load):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "no question" in result.output and "add the question" in result.output


def test_json_errors_are_json_on_stdout(tmp_path):
    result = CliRunner().invoke(cli, ["ask", "--json", "-m", str(tmp_path / "missing"), EXAMPLE, "Q?"])
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert "missing" in error["message"] and error["type"] == "invalid_request_error"
    assert error["code"] == "model_error"
    assert error["message"] in result.stderr                 # the sentence on stderr, as without --json


def test_group_quiet_and_verbose(monkeypatch):
    import os

    import huatuo_lite.api as api
    from huatuo_lite.errors import HuatuoError

    seen = {}

    def fake_load(model, **kwargs):
        seen.update({k: os.environ.get(k) for k in ("HUATUO_LITE_NO_NOTICE", "TQDM_DISABLE", "HUATUO_LITE_VERBOSE")})
        raise HuatuoError("stop here.")

    monkeypatch.setattr(api, "load", fake_load)
    clean = {"HUATUO_LITE_NO_NOTICE": None, "TQDM_DISABLE": None, "HUATUO_LITE_VERBOSE": None}
    result = CliRunner().invoke(cli, ["-m", "x", EXAMPLE, "Q?"], env=clean)
    assert "research use only" in result.stderr and seen == dict.fromkeys(clean)
    result = CliRunner().invoke(cli, ["-q", "-v", "ask", "-m", "x", EXAMPLE, "Q?"], env=clean)
    assert "research use only" not in result.stderr
    assert seen == {"HUATUO_LITE_NO_NOTICE": "1", "TQDM_DISABLE": "1", "HUATUO_LITE_VERBOSE": "1"}


def test_shell_completion():
    env = {**os.environ, "_HUATUO_LITE_COMPLETE": "bash_source"}
    done = subprocess.run([sys.executable, "-m", "huatuo_lite.cli"], env=env, capture_output=True, text=True)
    assert "_huatuo_lite_completion" in done.stdout and "complete " in done.stdout
    env.update(_HUATUO_LITE_COMPLETE="bash_complete", COMP_WORDS="huatuo-lite conv", COMP_CWORD="1")
    done = subprocess.run([sys.executable, "-m", "huatuo_lite.cli"], env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["plain,convert"]
