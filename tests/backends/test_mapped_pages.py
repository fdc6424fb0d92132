"""The text GGUF's mapped pages leave the process as llama.cpp loads it (issue #19: `ask` on
the 7B Q4_K_M peaked at 9.2 GB against stock's 8.5 because the original bytes of the tensors
llama.cpp repacks stayed mapped). Measured per mapping from /proc/self/smaps."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc only")

from huatuo_lite.backends import gguf_llama  # noqa: E402

DEMO_TEXT = Path(__file__).resolve().parents[2] / "models/demo/gguf/huatuo-lite-demo-Q8_0.gguf"


def resident_kb(path: Path) -> int:
    """Rss (kB) of every mapping of `path` in this process."""
    target, total, inside = os.path.realpath(path), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:   # a mapping's header line
            inside = len(fields) == 6 and fields[5] == target
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def load_and_measure(monkeypatch, drop: bool) -> tuple[int, object]:
    if not drop:
        monkeypatch.setattr(gguf_llama.MappedPageDropper, "__call__", lambda self, progress, data: True)
    gguf_llama.quiet_llama()
    model = gguf_llama.load_model(DEMO_TEXT)
    return resident_kb(DEMO_TEXT), model


def test_loaded_model_keeps_no_mapped_pages_and_still_answers(monkeypatch):
    import llama_cpp

    size_kb = DEMO_TEXT.stat().st_size // 1024
    kept, model_kept = load_and_measure(monkeypatch, drop=False)
    monkeypatch.undo()
    dropped, model = load_and_measure(monkeypatch, drop=True)
    try:
        # without the dropper llama.cpp's MAP_POPULATE leaves (most of) the file resident: the control
        assert kept > size_kb // 2, (kept, size_kb)
        assert dropped < kept // 8, (dropped, kept)
        # the dropped pages come back on demand: the model still evaluates a token
        ctx = gguf_llama.new_context(model, 64, 1, 8)
        batch = gguf_llama.Batch(8)
        import numpy as np

        batch.fill(0, 1, np.array([True]), tokens=[1])
        assert llama_cpp.llama_decode(ctx, batch.batch) == 0
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, 0),
                                       shape=(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)),))
        assert np.isfinite(logits).all() and logits.std() > 0
        batch.close()
        llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)
        llama_cpp.llama_model_free(model_kept)


def test_drop_is_a_no_op_for_a_file_not_mapped(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF")
    assert gguf_llama.drop_mapped_pages(str(path)) == 0


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_kb(address: int) -> int:
    """AnonHugePages (kB) of the mapping holding `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == "AnonHugePages:":
            return int(fields[1])
    return 0


@pytest.mark.skipif(not THP_MODE.exists() or "[madvise]" not in THP_MODE.read_text(),
                    reason="the kernel's THP mode is not 'madvise' (with 'always' every mapping gets them)")
def test_new_weight_sized_buffers_get_huge_pages_and_others_do_not():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size, PROT_RW, PRIVATE_ANONYMOUS = 64 << 20, 3, 0x22   # what malloc does for a large block

    before = gguf_llama._anonymous_ranges()
    advised_buf = libc.mmap(None, size, PROT_RW, PRIVATE_ANONYMOUS, -1, 0)   # stands for CPU_REPACK, unwritten
    advised = gguf_llama._advise_new(before, gguf_llama.MADV_HUGEPAGE)
    plain_buf = libc.mmap(None, size, PROT_RW, PRIVATE_ANONYMOUS, -1, 0)     # allocated after: the control
    for buf in (advised_buf, plain_buf):
        ctypes.memset(buf, 1, size)
    address = lambda buf: buf
    try:
        assert advised >= size
        assert huge_kb(address(advised_buf)) >= 32 << 10
        assert huge_kb(address(plain_buf)) == 0
    finally:
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.munmap(advised_buf, size)
        libc.munmap(plain_buf, size)


def test_huge_page_advice_is_opt_in(monkeypatch, tmp_path):
    monkeypatch.delenv(gguf_llama.HUGEPAGES_ENV, raising=False)
    assert gguf_llama.MappedPageDropper(tmp_path / "x.gguf")._before is None
    monkeypatch.setenv(gguf_llama.HUGEPAGES_ENV, "0")
    assert gguf_llama.MappedPageDropper(tmp_path / "x.gguf")._before is None
    monkeypatch.setenv(gguf_llama.HUGEPAGES_ENV, "1")
    assert gguf_llama.MappedPageDropper(tmp_path / "x.gguf")._before is not None
