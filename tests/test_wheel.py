"""The wheel builds, installs into a fresh virtual environment with only the
runtime dependencies (no torch), and answers on a converted GGUF model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from fixtures_gguf import gguf_7b_f32  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT.parent / "shared" / "wheels"


def sh(*args, cwd, **kwargs):
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path, and the
    # source tree's huatuo_lite/ would shadow the installed package.
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, cwd=cwd, **kwargs)


@pytest.mark.slow
def test_wheel_installs_and_answers(gguf_7b_f32, tmp_path):
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", ROOT, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("huatuo_lite-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    links = ["--find-links", WHEELS] if WHEELS.is_dir() else []
    sh(python, "-m", "pip", "install", "-q", *links, wheel, cwd=tmp_path)
    cli = env_dir / "bin" / "huatuo-lite"
    assert "Usage" in sh(cli, "--help", cwd=tmp_path).stdout
    image = str(sh(python, "-c", "import importlib.resources as r; "
                   "print(r.files('huatuo_lite.models') / 'examples' / 'chest_xray.png')", cwd=tmp_path).stdout.strip())
    env = {**os.environ, "HUATUO_LITE_NO_NOTICE": "1", "HF_HUB_OFFLINE": "1"}
    out = sh(cli, "ask", "-m", gguf_7b_f32, "--json", "--temperature", "0", "--max-tokens", "4",
             "--threads", "1", image, "Is there a nodule?", env=env, cwd=tmp_path).stdout
    assert json.loads(out)["completion_tokens"] > 0
    leaked = sh(python, "-c", "import importlib.util as u; print(u.find_spec('torch') is None)",
                cwd=tmp_path).stdout.strip()
    assert leaked == "True"                      # the runtime install pulled no torch
