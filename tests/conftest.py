"""Shared fixtures: one thread everywhere, and tiny upstream-format checkpoints
built once per session (each test that needs a model makes or reuses its own)."""
from __future__ import annotations

import os

import pytest

# Two shared cores: multi-threaded engines make timings and even test runtimes swing.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HUATUO_LITE_NO_NOTICE", "1")


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="also run the opt-in long tests (marker `long`): the demo recipe, the "
                          "1000-request soak, the long fuzz profiles (or set HUATUO_LITE_LONG=1)")


def pytest_configure(config):
    if config.getoption("--long"):
        os.environ["HUATUO_LITE_LONG"] = "1"       # read by the fuzz modules for their example counts


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
    tiny = pytest.importorskip("huatuo_lite.convert.tiny")
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
