"""The wheel builds, installs into a fresh virtual environment with only the
runtime dependencies (no torch), and answers on a converted GGUF model.

The test never compiles llama.cpp: it takes a wheel folder of the pinned
llama-cpp-python from $HUATUO_LITE_WHEELS or ../shared/wheels when there is one,
and otherwise reuses the llama-cpp-python installed here (exposed to the fresh
environment alone, through a .pth file, so pip counts it as installed)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from support.engines import skip_without
skip_without('torch', 'gguf', 'llama_cpp')

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT.parent / "shared" / "wheels"
LLAMA_DIST = "llama_cpp_python"


def wheel_folder() -> Path | None:
    """A folder holding a prebuilt llama-cpp-python wheel, if one is given or lies beside."""
    for folder in (os.environ.get("HUATUO_LITE_WHEELS"), WHEELS):
        if folder and any(Path(folder).glob(f"{LLAMA_DIST}-*.whl")):
            return Path(folder)
    return None


def reuse_installed_llama_cpp(env_dir: Path, tmp_path: Path) -> None:
    """Expose this interpreter's llama-cpp-python (package and metadata, nothing
    else) to the fresh environment, so pip finds the pin satisfied instead of
    building llama.cpp from source (~15 min on 2 cores)."""
    try:
        dist = importlib.metadata.distribution(LLAMA_DIST.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llama-cpp-python is not installed here and no wheel folder is given "
                    "(set HUATUO_LITE_WHEELS): the test will not compile llama.cpp")
    site = Path(dist.locate_file(""))
    shared = tmp_path / "reused-llama-cpp"
    shared.mkdir()
    info = next(f.parts[0] for f in dist.files if f.parts[0].endswith(".dist-info"))
    for name in ("llama_cpp", info):                           # the package and its metadata
        (shared / name).symlink_to(site / name)
    purelib = sh(env_dir / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                 cwd=tmp_path).stdout.strip()
    (Path(purelib) / "huatuo_reuse_llama_cpp.pth").write_text(f"{shared}\n")


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
    links = wheel_folder()
    if links is None:
        reuse_installed_llama_cpp(env_dir, tmp_path)
    sh(python, "-m", "pip", "install", "-q", *(["--find-links", links] if links else []), wheel, cwd=tmp_path)
    built = sh(python, "-m", "pip", "show", "-f", "llama-cpp-python", cwd=tmp_path).stdout
    assert "Version: 0.3.36" in built
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
