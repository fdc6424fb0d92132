"""Thin helpers over llama-cpp-python's low-level API (model, context, batches) and a
tiny GGUF metadata reader (the runtime does not depend on the `gguf` package)."""
from __future__ import annotations

import ctypes
import os
import struct
import sys
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError


# ggml's log levels as this llama.cpp numbers them (llama-cpp-python 0.3.36's own callback maps
# an older numbering, so it printed llama.cpp's warnings as errors)
GGML_LOG_ERROR, GGML_LOG_CONT = 4, 5
_last_level = [0]


def _log_callback():
    import llama_cpp

    @llama_cpp.llama_log_callback
    def log(level, text, user_data):
        level = _last_level[0] if level == GGML_LOG_CONT else level
        _last_level[0] = level
        if level == GGML_LOG_ERROR or os.environ.get("HUATUO_LITE_VERBOSE"):
            sys.stderr.write(text.decode("utf-8", errors="replace"))
            sys.stderr.flush()

    return log


_LOG = []   # the callback, kept alive while llama.cpp holds it


def quiet_llama() -> None:
    """Silence llama.cpp's and libmtmd's info logs and warnings (errors still show), unless
    `huatuo-lite -v` asked for them (it sets HUATUO_LITE_VERBOSE)."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    if not _LOG:
        _LOG.append(_log_callback())
    llama_cpp.llama_log_set(_LOG[0], ctypes.c_void_p(0))
    for setter in (getattr(mtmd_cpp, "mtmd_log_set", None), getattr(mtmd_cpp, "mtmd_helper_log_set", None)):
        if setter is not None:
            setter(_LOG[0], ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


def load_model(path: Path, gpu_layers: int = 0, vocab_only: bool = False):
    """The text model; vocab_only: just its hyper-parameters and vocabulary, no weights
    (what libmtmd needs of it: n_embd and the tokenizer). While it loads, the file's mapped
    pages are dropped from this process as the loader goes (see MappedPageDropper)."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = int(gpu_layers)
    params.vocab_only = vocab_only
    if not vocab_only:
        dropper = MappedPageDropper(path)
        callback = llama_cpp.llama_progress_callback(dropper)
        params.progress_callback = callback
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelFormatError(f"llama.cpp cannot load {path}: the file is truncated, corrupt or not a "
                               "text model GGUF; convert or download it again.")
    return model


# madvise(2) advice. DONTNEED: drop this range's pages from the process (file-backed, read-only:
# the page cache keeps them; a later read faults them back in, a minor fault). HUGEPAGE: back
# this range with 2 MiB pages as it is first written (THP "madvise" mode, the common default).
MADV_DONTNEED, MADV_HUGEPAGE = 4, 14
DROP_EVERY = 0.05        # of the bytes loaded: bounds the file pages resident between two drops
HUGE_MIN_BYTES = 32 << 20
# "1": huge pages under the repacked weights. Off by default: on the 7B Q4_K_M they gave decode
# 1.05x stock (6.53 vs 6.24 tok/s; ours on 4 KiB pages 6.21) but cost ~3 s more load (the kernel
# compacts memory to find 2 MiB pages: 10.2-11.5 s against 6.8-10.2), which a one-shot `ask`
# of a few dozen tokens never wins back; a long-lived server or chat does (bench/decode_pages.py).
HUGEPAGES_ENV = "HUATUO_LITE_HUGEPAGES"


class MappedPageDropper:
    """A llama.cpp load-progress callback that (1) drops the GGUF's mapped pages from this
    process and (2) with HUATUO_LITE_HUGEPAGES=1, asks for huge pages under the weight buffers
    llama.cpp has just allocated.

    (1) llama.cpp maps the whole text GGUF with MAP_POPULATE (every page resident at once), then
    copies each tensor it can repack (Q4_K, Q4_0, IQ4_NL on AVX2/NEON) into an anonymous
    CPU_REPACK buffer and never reads those bytes of the file again. Kept mapped, they stay in
    this process's RSS: on the 7B Q4_K_M, ~3 GB of the 4.4 GB file (ask peaked at 9.2 GB
    against stock's 8.5). Dropped every few percent of the load, only what is still read
    (the tensors left in the mapping: Q6_K, norms, the embedding rows asked for) faults back
    in as the model runs, from the page cache, which still holds the file for other processes.
    (2) The first call comes after llama.cpp allocated its buffers and before it writes them:
    the new anonymous mappings of at least HUGE_MIN_BYTES (the repacked weights: [rows, cols]
    interleaved 8x8 blocks, 3 GB on the 7B) get MADV_HUGEPAGE, so every decode step reads them
    through 2 MiB TLB entries instead of 4 KiB ones (under a VM's nested paging a read of
    4 KiB pages ran at ~4 GB/s against ~10 with huge pages, bench/roofline.py).
    Linux only (/proc/self/maps); elsewhere a no-op."""

    def __init__(self, path: Path):
        self.path = os.path.realpath(path)
        self._last = -1.0
        self._before = _anonymous_ranges() if os.environ.get(HUGEPAGES_ENV, "0") == "1" else None

    def __call__(self, progress: float, user_data) -> bool:
        try:   # an exception cannot cross into llama.cpp: a failed advice only costs memory or speed
            if self._before is not None:
                _advise_new(self._before, MADV_HUGEPAGE)
                self._before = None
            if progress >= 1.0 or progress - self._last >= DROP_EVERY:
                self._last = progress
                drop_mapped_pages(self.path)
        except Exception:
            pass
        return True   # False would cancel the load


def _maps() -> list[tuple[int, int, str, str]]:
    """(start, end, permissions, path or '') of this process's mappings; [] without /proc."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    rows = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        rows.append((start, end, fields[1], fields[5].strip() if len(fields) == 6 else ""))
    return rows


_LIBC = []   # the C library's madvise, bound once


def _madvise(start: int, length: int, advice: int) -> bool:
    if not _LIBC:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _LIBC.append(libc.madvise)
    return _LIBC[0](start, length, advice) == 0


def _anonymous_ranges() -> set:
    return {(a, b) for a, b, perms, name in _maps() if not name and perms.startswith("rw")}


def _advise_new(before: set, advice: int) -> int:
    """Advise the anonymous read-write mappings of >= HUGE_MIN_BYTES not in `before`; bytes advised."""
    done = 0
    for start, end in _anonymous_ranges() - before:
        if end - start >= HUGE_MIN_BYTES and _madvise(start, end - start, advice):
            done += end - start
    return done


def drop_mapped_pages(path: str) -> int:
    """madvise(MADV_DONTNEED) every mapping of `path` in this process; the bytes covered."""
    return sum(end - start for start, end, _, name in _maps()
               if name == path and _madvise(start, end - start, MADV_DONTNEED))


def new_context(model, n_ctx: int, threads: int, n_batch: int, exact: bool = False):
    """A context with one sequence. exact=True: F32 KV cache and no flash attention
    (llama.cpp's F16 KV / CPU flash attention cost 3e-4 / 3e-3 relative logit error
    on a 600-token prompt of an F32 model; exact: 6e-7)."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    if exact:
        params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise ModelFormatError(f"llama.cpp could not create a context of {n_ctx} tokens; try a smaller --n-ctx.")
    return ctx


class Batch:
    """One reusable llama_batch of up to `capacity` tokens (ids) or embeddings (width n_embd)."""

    def __init__(self, capacity: int, n_embd: int = 0, n_pos_per_embd: int = 1):
        import llama_cpp

        self._llama = llama_cpp
        self.capacity, self.n_embd = capacity, n_embd
        self.batch = llama_cpp.llama_batch_init(capacity, n_embd, 1)
        # M-RoPE (qwen2vl): an embedding batch carries 4 positions per row, section-major
        # (pos[j*n + i]: time, row, col, 0), as libmtmd's helper lays them out; the array
        # llama_batch_init made holds `capacity`, so ours stands in until close().
        self._own_pos = self._saved_pos = None
        if n_embd and n_pos_per_embd > 1:
            self._own_pos = (llama_cpp.llama_pos * (capacity * n_pos_per_embd))()
            # the address as a number: a pointer read from a struct field is a view of that field
            self._saved_pos = ctypes.cast(self.batch.pos, ctypes.c_void_p).value
            self.batch.pos = ctypes.cast(self._own_pos, type(self.batch.pos))

    def fill(self, start_pos: int, n: int, want_logits: np.ndarray, tokens=None, embd=None,
             positions: np.ndarray | None = None) -> None:
        """Positions start_pos.. (or `positions` int [3, n]: time, row, col), sequence 0;
        logits where want_logits[i]."""
        b = self.batch
        b.n_tokens = n
        if embd is not None:   # float32 [n, n_embd]
            data = np.ascontiguousarray(embd, dtype=np.float32)
            ctypes.memmove(b.embd, data.ctypes.data, data.nbytes)
        for i in range(n):
            if tokens is not None:
                b.token[i] = int(tokens[i])
            b.pos[i] = start_pos + i if positions is None else int(positions[0][i])
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = bool(want_logits[i])
        if positions is not None and self._own_pos is not None:
            for section in (1, 2):
                for i in range(n):
                    b.pos[section * n + i] = int(positions[section][i])
            for i in range(n):
                b.pos[3 * n + i] = 0

    def close(self) -> None:
        if self.batch is not None:
            if self._saved_pos is not None:   # llama_batch_free frees what llama_batch_init made
                self.batch.pos = ctypes.cast(self._saved_pos, type(self.batch.pos))
            self._llama.llama_batch_free(self.batch)
            self.batch = None


# ------------------------------------------------------------ GGUF header ----
# GGUF value type -> struct format (fixed-size scalars); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path: Path) -> dict:
    """The key/value metadata of a GGUF file (arrays of scalars as lists, strings decoded)."""
    try:
        with open(path, "rb") as fh:
            magic, _version, _n_tensors, n_kv = struct.unpack("<4sIQQ", fh.read(24))
            if magic != b"GGUF":
                raise ValueError("bad magic")
            return dict(_read_kv(fh) for _ in range(n_kv))
    except (OSError, ValueError, struct.error, UnicodeDecodeError, KeyError):
        raise ModelFormatError(f"{path} is not a readable GGUF file (truncated or corrupt); "
                               "convert or download it again.") from None


def _read_kv(fh) -> tuple:
    key = _read_str(fh)
    (vtype,) = struct.unpack("<I", fh.read(4))
    return key, _read_value(fh, vtype)


def _read_str(fh) -> str:
    (n,) = struct.unpack("<Q", fh.read(8))
    data = fh.read(n)
    if len(data) != n:
        raise ValueError("short read")
    return data.decode("utf-8")


def _read_value(fh, vtype: int):
    if vtype == 8:
        return _read_str(fh)
    if vtype == 9:
        (item_type, n) = struct.unpack("<IQ", fh.read(12))
        if item_type in _SCALARS:
            fmt = _SCALARS[item_type]
            size = struct.calcsize(fmt)
            return list(struct.unpack(f"<{n}{fmt}", fh.read(size * n)))
        return [_read_value(fh, item_type) for _ in range(n)]
    fmt = _SCALARS[vtype]
    return struct.unpack(f"<{fmt}", fh.read(struct.calcsize(fmt)))[0]
