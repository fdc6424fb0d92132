"""The bundled demo model by name (`-m demo`, `models list`), `models info`'s image-path
verdict, and the llama.cpp quantize step's progress line."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from huatuo_lite import store
from huatuo_lite.cli.main import cli

pytestmark = pytest.mark.skipif(store.demo_model() is None, reason="this install ships no demo model")


def test_demo_is_listed_and_resolves_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HUATUO_LITE_HOME", str(tmp_path))
    result = CliRunner().invoke(cli, ["models", "list"])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0].split()
    assert first[:3] == ["demo", "bundled", "gguf"] and first[3] == str(store.demo_model())
    assert store.resolve("demo") == store.demo_model()


def test_a_stored_model_named_demo_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("HUATUO_LITE_HOME", str(tmp_path))
    (tmp_path / "models" / "demo").mkdir(parents=True)
    assert store.resolve("demo") == tmp_path / "models" / "demo"


def test_models_info_says_the_self_test_verdict(tmp_path, monkeypatch):
    monkeypatch.setenv("HUATUO_LITE_HOME", str(tmp_path))
    result = CliRunner().invoke(cli, ["models", "info", "demo"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    manifest = json.loads((store.demo_model() / "manifest.json").read_text())
    test = manifest["mtmd_self_test"]
    verdict = info["image_path_self_test"]
    assert ("passed" if test["passed"] else "failed") in verdict and f"{test['min_cosine']:.4f}" in verdict


def test_quantize_progress_bar_follows_the_output_size(tmp_path, capsys):
    import time

    from huatuo_lite.convert.gguf.export import _size_progress

    out = tmp_path / "x.gguf"
    with _size_progress(out, "x.gguf (llama.cpp Q4_K_M)", every_s=0.05):
        out.write_bytes(b"\0" * 4096)
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert "x.gguf (llama.cpp Q4_K_M)" in err and "4.10kB" in err
