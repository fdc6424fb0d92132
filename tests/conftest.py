"""Fixtures shared by more than one test folder: one thread everywhere, the tiny upstream-format
checkpoints, their torch reference engines, and their GGUF / ONNX conversions, each built once per
session. A fixture used by one folder only lives in that folder's conftest.py; plain helpers (not
fixtures) are in tests/support/ and are imported by name."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Two shared cores: multi-threaded engines make timings and even test runtimes swing.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HUATUO_LITE_NO_NOTICE", "1")
# The persistent prefix/feature cache of a test run lives and dies with the run, never in the
# user's ~/.cache/huatuo-lite/cache (tests that need their own point HUATUO_LITE_CACHE elsewhere).
OWN_CACHE = None if "HUATUO_LITE_CACHE" in os.environ else tempfile.mkdtemp(prefix="huatuo-test-cache-")
if OWN_CACHE:
    os.environ["HUATUO_LITE_CACHE"] = OWN_CACHE


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="also run the opt-in long tests (marker `long`): the demo recipe, the "
                          "1000-request soak, the long fuzz profiles (or set HUATUO_LITE_LONG=1)")


def pytest_configure(config):
    if config.getoption("--long"):
        os.environ["HUATUO_LITE_LONG"] = "1"       # read by the fuzz modules for their example counts


def pytest_unconfigure(config):
    if OWN_CACHE:
        shutil.rmtree(OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("HUATUO_LITE_LONG") == "1":
        return
    skip = pytest.mark.skip(reason="a long test: run with `python -m pytest --long -m long` (CI does)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


def _torch_one_thread():
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


_torch_one_thread()


def _tiny(tmp_path_factory, variant):
    tiny = pytest.importorskip("huatuo_lite.convert.tiny.make")
    out = tmp_path_factory.mktemp(f"tiny-{variant}")
    return tiny.make_tiny(out / "model", variant=variant, seed=0)


@pytest.fixture(scope="session")
def tiny_7b(tmp_path_factory):
    return _tiny(tmp_path_factory, "7b")


@pytest.fixture(scope="session")
def tiny_34b(tmp_path_factory):
    return _tiny(tmp_path_factory, "34b")


@pytest.fixture(scope="session")
def tiny_7b_hf(tmp_path_factory):
    return _tiny(tmp_path_factory, "7b-hf")


# The torch reference engines, opened once per session and shared by every
# backend's comparison tests.
def _reference(src):
    from huatuo_lite.backends import load_backend

    engine = load_backend("torch").open_engine(src, threads=1)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def torch_7b(tiny_7b):
    yield from _reference(tiny_7b)


@pytest.fixture(scope="session")
def torch_34b(tiny_34b):
    yield from _reference(tiny_34b)


@pytest.fixture(scope="session")
def torch_7b_hf(tiny_7b_hf):
    yield from _reference(tiny_7b_hf)


# GGUF conversions (were tests/fixtures_gguf.py). The F32 folders are complete (text + mmproj +
# vision.onnx + self-test); the F16/Q8_0/Q4_K_M folders of the 7B are text-only (vision_onnx=False)
# because their tests are teacher-forced on text.
def _convert(src, tmp_path_factory, label, quant, **options):
    for module in ("torch", "gguf", "llama_cpp"):
        pytest.importorskip(module)
    from huatuo_lite.convert.gguf.export import export_gguf

    out = tmp_path_factory.mktemp(f"gguf-{label}-{quant}")
    export_gguf(src, out, quant=quant, threads=1, **options)
    return out


@pytest.fixture(scope="session")
def gguf_7b_f32(tiny_7b, tmp_path_factory):
    return _convert(tiny_7b, tmp_path_factory, "7b", "F32")


@pytest.fixture(scope="session")
def gguf_34b_f32(tiny_34b, tmp_path_factory):
    return _convert(tiny_34b, tmp_path_factory, "34b", "F32")


@pytest.fixture(scope="session")
def gguf_7b_hf_f32(tiny_7b_hf, tmp_path_factory):
    return _convert(tiny_7b_hf, tmp_path_factory, "7b-hf", "F32")


@pytest.fixture(scope="session")
def gguf_7b_f16(tiny_7b, tmp_path_factory):
    return _convert(tiny_7b, tmp_path_factory, "7b", "F16", vision_onnx=False)


@pytest.fixture(scope="session")
def gguf_7b_q8_0(tiny_7b, tmp_path_factory):
    return _convert(tiny_7b, tmp_path_factory, "7b", "Q8_0", mmproj_type="Q8_0", vision_onnx=False)


@pytest.fixture(scope="session")
def gguf_7b_q4_k_m(tiny_7b, tmp_path_factory):
    return _convert(tiny_7b, tmp_path_factory, "7b", "Q4_K_M", vision_onnx=False)


# The fp32 ONNX export of the 7B (was tests/fixtures_onnx.py; the other exports are in
# tests/convert/onnx/conftest.py, the only folder that uses them).
@pytest.fixture(scope="session")
def onnx_7b(tiny_7b, tmp_path_factory):
    from support.engines import export_onnx_once

    return export_onnx_once(tiny_7b, tmp_path_factory, "7b-fp32", quant="fp32")
