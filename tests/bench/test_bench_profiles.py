"""bench/profiles.py's disk check counts what the chosen rows still need to build, so a
7b run of one row is not refused for the space of rows it will not build."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import profiles  # noqa: E402
from huatuo_lite.errors import HuatuoError  # noqa: E402


def test_disk_needed_counts_only_unbuilt_chosen_rows(tmp_path):
    profile = profiles.get_profile("7b")
    one = ["gguf Q4_K_M"]
    assert profiles.disk_needed_gb(profile, tmp_path, one) == pytest.approx(17 + 21)
    assert profiles.disk_needed_gb(profile, tmp_path, profiles.default_labels(profile)) == \
        pytest.approx(17 + 16 + 9 + 21 + 9 + 5)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert profiles.disk_needed_gb(profile, tmp_path, one + ["torch fp32"]) == pytest.approx(21)
    (tmp_path / "gguf-Q4_K_M").mkdir()
    (tmp_path / "gguf-Q4_K_M" / "manifest.json").write_text("{}")
    assert profiles.disk_needed_gb(profile, tmp_path, one) == 0


def test_check_refuses_when_the_rows_do_not_fit(tmp_path, monkeypatch):
    profile = profiles.get_profile("7b")
    monkeypatch.setattr(profiles.shutil, "disk_usage", lambda _: type("U", (), {"free": 30e9})())
    with pytest.raises(HuatuoError, match="need about 38 GB"):
        profiles._check_disk(profile, tmp_path, ["gguf Q4_K_M"])
    profiles._check_disk(profile, tmp_path, ["onnx int4"])          # 17 + 5 GB fits in 30


def test_peak_sampler_tells_owned_memory_from_mapped_files(tmp_path):
    """A build's VmHWM counts mmapped inputs (llama.cpp's quantizer maps its intermediate);
    the sampler separates them: 200 MB allocated shows as anonymous, a 100 MB file read
    through a mapping as file-backed."""
    import mmap
    import time

    import numpy as np

    from measure import PeakSampler

    data = tmp_path / "mapped.bin"
    data.write_bytes(b"\1" * 100 * 2**20)
    with PeakSampler(every=0.02) as idle:          # what this process holds already (in a full
        time.sleep(0.1)                            # test run: torch's mapped libraries, ...)
    before = idle.peaks()
    with PeakSampler(every=0.02) as sampler:
        owned = np.ones(25 * 2**20)                       # 200 MB
        time.sleep(0.2)
        del owned
        with open(data, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            total = sum(m[i] for i in range(0, len(m), 4096))   # touch every page
            time.sleep(0.2)
    assert total == 100 * 2**20 // 4096
    peaks = sampler.peaks()
    grown = {key: peaks[key] - before[key] for key in ("peak_anon_mb", "peak_file_mb")}
    assert grown["peak_anon_mb"] >= 190 and grown["peak_file_mb"] >= 95, (peaks, before)
    assert grown["peak_file_mb"] < 190, (peaks, before)        # the array was not file-backed
