"""CliRunner tests for chat and the model store commands."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from support.engines import skip_without
skip_without('torch', 'gguf', 'llama_cpp')
from huatuo_lite.cli.main import cli

EXAMPLE = str(Path(__file__).resolve().parents[2] / "models" / "examples" / "chest_xray.png")


def run(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def test_chat_session_with_commands(tiny_7b):
    script = "\n".join(["What is shown?", f"/image {EXAMPLE}", "And now?", "/image", "/reset", "/quit"]) + "\n"
    result = run("chat", "-m", tiny_7b, "--temperature", "0", "--max-tokens", "3", "-q", EXAMPLE, input=script)
    assert result.exit_code == 0, result.output
    assert "image 2 attached" in result.output
    assert "Error: Give a path" in result.output             # a bad command does not end the chat
    assert "conversation cleared" in result.output


def test_chat_ends_at_end_of_input(tiny_7b):
    result = run("chat", "-m", tiny_7b, "--max-tokens", "2", "-q", input="")
    assert result.exit_code == 0


DEMO = Path(__file__).resolve().parents[2] / "models" / "demo" / "gguf"
DEMO_IMAGE = DEMO.parent / "eval" / "images" / "test_00000.png"     # an MRI with a lesion


@pytest.mark.parametrize("last", ["\n", ""])        # the question ends with the input, too
def test_chat_piped_lines_ending_in_backslash_make_one_question(last):
    # The demo model answers the lettered question with its letter (A = Yes here) and the
    # first line alone with no letter: the letter shows every line reached the model.
    lines = ["Is any lesion visible? \\", "A. Yes \\", "B. No \\",
             "Answer with the option's letter from the given choices directly."]
    answers = []
    for script in ("\n".join(lines) + last, lines[0].rstrip(" \\") + "\n"):
        result = run("chat", "-m", DEMO, "--threads", "1", "--temperature", "0", "-q", DEMO_IMAGE, input=script)
        assert result.exit_code == 0, result.output
        answers.append(result.stdout.replace("> ", "").replace("... ", "").strip())
    assert answers[0] == "A" and answers[1] != "A", answers


def test_chat_help_command_and_no_history_written_from_a_pipe(tmp_path, monkeypatch):
    monkeypatch.setenv("HUATUO_LITE_HOME", str(tmp_path))
    result = run("chat", "-m", DEMO, "--threads", "1", "-q", input="/help\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "A line ending in \\ continues" in result.output and "Ctrl-C" in result.output
    assert not (tmp_path / "chat_history").exists()      # scripts' questions are not kept


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("HUATUO_LITE_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    return tmp_path / "models"


def test_models_list_shows_registry_and_installed(store, gguf_7b_f16):
    shutil.copytree(gguf_7b_f16, store / "mine")
    result = run("models", "list")
    assert result.exit_code == 0
    assert "mine" in result.output and "installed" in result.output and "gguf" in result.output
    assert "FreedomIntelligence/HuatuoGPT-Vision-7B" in result.output


def test_models_info_and_verify(store, gguf_7b_f16):
    folder = Path(shutil.copytree(gguf_7b_f16, store / "mine"))
    info = json.loads(run("models", "info", "mine").output)
    assert info["format"] == "gguf" and info["backend"] == "gguf"
    assert run("models", "verify", "mine").exit_code == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    text = folder / next(n for n, e in manifest["files"].items() if e["role"] == "text")
    data = bytearray(text.read_bytes())
    data[-1] ^= 0xFF                                           # same size, one byte changed
    text.write_bytes(bytes(data))
    result = run("models", "verify", "mine")
    assert result.exit_code == 1 and text.name in result.output


def test_models_rm(store, gguf_7b_f16):
    shutil.copytree(gguf_7b_f16, store / "mine")
    assert run("models", "rm", "mine", input="n\n").exit_code == 1 and (store / "mine").exists()
    assert run("models", "rm", "mine", "--yes").exit_code == 0 and not (store / "mine").exists()
    assert run("models", "rm", "mine", "--yes").exit_code == 1


def test_models_pull_refused_offline(store, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("models", "pull", "huatuogpt-vision-7b")
    assert result.exit_code == 1 and "HF_HUB_OFFLINE" in result.output
    assert run("models", "pull", "no-such-model").exit_code == 1


def test_models_pull_uses_hub_with_patterns(store, monkeypatch):
    """pull hands the registry's repo and file patterns to huggingface-hub (no network here)."""
    import huggingface_hub

    calls = {}

    def download(**kw):                 # writes into local_dir, as huggingface-hub does
        calls.update(kw)
        Path(kw["local_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(kw["local_dir"]) / "config.json").write_text("{}")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    result = run("models", "pull", "huatuogpt-vision-7b")
    assert result.exit_code == 0, result.output
    assert calls["repo_id"] == "FreedomIntelligence/HuatuoGPT-Vision-7B" and "*.safetensors" in calls["allow_patterns"]
    # downloaded under a hidden name, renamed into place when complete
    assert Path(calls["local_dir"]).name.startswith(".") and not Path(calls["local_dir"]).exists()
    assert (store / "huatuogpt-vision-7b" / "config.json").is_file()


def test_model_names_resolve_without_network(store, gguf_7b_f16, monkeypatch):
    """--model takes a folder, a store name, a registry name or its hub repo id."""
    import huatuo_lite.store as st

    shutil.copytree(gguf_7b_f16, store / "huatuogpt-vision-7b")
    for name in ("huatuogpt-vision-7b", "FreedomIntelligence/HuatuoGPT-Vision-7B"):
        assert st.resolve(name) == store / "huatuogpt-vision-7b"
    with pytest.raises(st.ModelFormatError, match="models pull"):
        st.resolve("someone/not-here")


def test_hub_cache_snapshot_is_found_offline(store, tmp_path, monkeypatch):
    import huatuo_lite.store as st

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--org--model" / "refs").mkdir()
    (cache / "models--org--model" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert st.resolve("org/model") == snapshot
