"""--threads beyond the machine's CPUs is clamped where every engine gets its
threads (backends.load_backend(...).open_engine), with a one-line warning."""
from __future__ import annotations

import subprocess
import sys
import types
import warnings

import pytest

from huatuo_lite import backends


@pytest.fixture
def fake_backend(monkeypatch):
    """A backend module that records the options its open_engine receives."""
    module = types.ModuleType("fake_backend_for_threads")
    module.received = []
    module.open_engine = lambda model_dir, **options: module.received.append(options) or "engine"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(backends.BACKEND_MODULES, "fake", module.__name__)
    return module


def test_threads_above_the_cpus_are_clamped_with_a_warning(fake_backend, monkeypatch):
    monkeypatch.setattr(backends, "available_cpus", lambda: 4)
    with pytest.warns(UserWarning) as caught:
        assert backends.load_backend("fake").open_engine("folder", threads=100000, quant="Q8_0") == "engine"
    assert fake_backend.received == [{"threads": 4, "quant": "Q8_0"}]
    assert [str(w.message) for w in caught] == [
        "--threads 100000 is more than the 4 CPUs of this machine: using 4."]


@pytest.mark.parametrize("options", [{"threads": 4}, {"threads": 1}, {}, {"threads": None}])
def test_threads_within_the_cpus_pass_unchanged(fake_backend, monkeypatch, options):
    monkeypatch.setattr(backends, "available_cpus", lambda: 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.load_backend("fake").open_engine("folder", **options)
    assert fake_backend.received == [options]


def test_the_backend_still_exposes_its_module(fake_backend):
    fake_backend.extra = 7
    backend = backends.load_backend("fake")
    assert backend.extra == 7 and backend.module is fake_backend


def test_available_cpus_is_positive():
    assert backends.available_cpus() >= 1


def test_cli_warns_in_one_line_and_answers(tmp_path):
    # The demo model with no image: the warning is one stderr line, the run succeeds.
    huge = backends.available_cpus() * 1000
    done = subprocess.run([sys.executable, "-m", "huatuo_lite.cli", "ask", "--threads", str(huge),
                           "--max-tokens", "2", "What is shown?"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**__import__("os").environ, "HUATUO_LITE_NO_NOTICE": "1"})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "--threads" in line]
    assert lines == [f"Warning: --threads {huge} is more than the "
                     f"{backends.available_cpus()} CPUs of this machine: using {backends.available_cpus()}."]
