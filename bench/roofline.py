"""The decode roofline: this machine's memory bandwidth and the bytes a decode step reads.

Decoding one token reads every weight of the text model once (the embedding table
only one row of it); at batch 1 that traffic bounds the speed:
    roofline tok/s = read bandwidth (B/s) / weight bytes read per token.
Bandwidth: the faster of a small stream-like C kernel (sum and copy over a 512 MiB
array in huge pages, OpenMP threads; compiled here when a C compiler exists) and numpy
kernels on a thread pool. Huge pages matter on this VM: without them the same C read
ran at ~4 GB/s instead of ~10 (TLB misses under nested paging).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARRAY_BYTES = 512 * 2**20     # far above any last-level cache
STREAM_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
#include <sys/mman.h>
/* read: sum of n floats in 8-wide vectors, 4 accumulators per thread so the adds keep
   up with memory; copy: b = a. Best of `reps` runs, GB/s (copy counts bytes read + written). */
typedef float v8 __attribute__((vector_size(32)));
int main(int argc, char **argv) {
    size_t n = strtoull(argv[1], 0, 10); int reps = atoi(argv[2]);
    size_t bytes = (n * 4 + (2u << 20) - 1) & ~((size_t)(2u << 20) - 1);
    float *a = aligned_alloc(2u << 20, bytes), *b = aligned_alloc(2u << 20, bytes);
    madvise(a, bytes, MADV_HUGEPAGE); madvise(b, bytes, MADV_HUGEPAGE);   /* as numpy does: fewer TLB misses */
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) { a[i] = 1.0f; b[i] = 0.0f; }
    double best_read = 1e30, best_copy = 1e30, sink = 0;
    for (int r = 0; r < reps; r++) {
        double t = omp_get_wtime(), s = 0;
        #pragma omp parallel reduction(+:s)
        {
            v8 acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0};
            #pragma omp for schedule(static)
            for (size_t i = 0; i < n; i += 32) {
                const v8 *p = (const v8 *)(a + i);
                acc0 += p[0]; acc1 += p[1]; acc2 += p[2]; acc3 += p[3];
            }
            v8 total = acc0 + acc1 + acc2 + acc3;
            for (int j = 0; j < 8; j++) s += total[j];
        }
        t = omp_get_wtime() - t; if (t < best_read) best_read = t; sink += s;
        t = omp_get_wtime();
        #pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) b[i] = a[i];
        t = omp_get_wtime() - t; if (t < best_copy) best_copy = t;
    }
    printf("{\"read_gbs\": %.3f, \"copy_gbs\": %.3f, \"check\": %.0f}\n",
           n * 4 / best_read / 1e9, 2.0 * n * 4 / best_copy / 1e9, sink + b[n / 2]);
    return 0;
}
"""


def _stream_binary() -> Path | None:
    """Compile the kernel once per machine (cached beside the benchmark's work files)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    cache = Path(tempfile.gettempdir()) / "huatuo-lite-bench"
    binary = cache / "stream"
    if binary.is_file():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    source = cache / "stream.c"
    source.write_text(STREAM_C)
    tmp = cache / f"stream.tmp{os.getpid()}"
    done = subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", str(source), "-o", str(tmp)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    tmp.replace(binary)
    return binary


def _c_bandwidth(threads: int, repeats: int) -> dict | None:
    binary = _stream_binary()
    if binary is None:
        return None
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_PROC_BIND": "spread"}
    done = subprocess.run([str(binary), str(ARRAY_BYTES // 4), str(repeats)], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    if done.returncode != 0:
        return None
    result = json.loads(done.stdout)
    result.pop("check")
    return {**result, "method": "C stream kernel (OpenMP)"}


def _numpy_bandwidth(threads: int, repeats: int) -> dict:
    """Each thread reads (count_nonzero over uint64) or copies its own slice; numpy drops the GIL."""
    import numpy as np

    a = np.ones(ARRAY_BYTES // 4, np.float32)
    b = np.empty_like(a)
    reads, dests = np.array_split(a.view(np.uint64), threads), np.array_split(b, threads)
    sources = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        def best(run) -> float:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(run())
                times.append(time.perf_counter() - t0)
            return min(times)

        read_s = best(lambda: pool.map(np.count_nonzero, reads))
        copy_s = best(lambda: pool.map(np.copyto, dests, sources))
    return {"read_gbs": a.nbytes / read_s / 1e9, "copy_gbs": 2 * a.nbytes / copy_s / 1e9,
            "method": "numpy on a thread pool"}


def measure_bandwidth(threads: int, repeats: int = 5) -> dict:
    """{'read_gbs', 'copy_gbs', 'method', 'threads', 'all'}: the kernel that read fastest
    (best of `repeats` passes each); a slow kernel only underestimates the machine."""
    kernels = [k for k in (_c_bandwidth(threads, repeats), _numpy_bandwidth(threads, repeats)) if k]
    best = max(kernels, key=lambda k: k["read_gbs"])
    return {**best, "threads": threads, "all": kernels}


# ------------------------------------------------------------ bytes per token ----
def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of every tensor of a text GGUF but the token embedding table (one row is read)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return int(sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight"))


def onnx_bytes_per_token(folder: Path) -> int:
    """decoder.onnx and its external data (the embedding table is a separate graph)."""
    from huatuo_lite.manifest import read_manifest

    files = read_manifest(folder)["files"]
    return int(sum(entry["size"] for name, entry in files.items() if name.startswith("decoder.onnx")))


def torch_bytes_per_token(ckpt: Path, bytes_per_value: int = 4) -> int:
    """Text-model weights other than the embedding table, held as fp32 by the reference."""
    from safetensors import safe_open

    total = 0
    for shard in sorted(Path(ckpt).glob("model-*.safetensors")):
        with safe_open(str(shard), framework="numpy") as f:
            for name in f.keys():
                if name.startswith(("model.layers.", "model.norm.", "lm_head.")):
                    count = 1
                    for dim in f.get_slice(name).get_shape():
                        count *= dim
                    total += count * bytes_per_value
    return total


BYTES_PER_TOKEN = {"torch": lambda target: torch_bytes_per_token(target.folder),
                   "gguf": lambda target: gguf_bytes_per_token(_text_gguf(target.folder)),
                   "onnx": lambda target: onnx_bytes_per_token(target.folder)}


def _text_gguf(folder: Path) -> Path:
    from profiles import text_gguf

    return text_gguf(folder)


def bytes_per_token(target) -> int:
    return BYTES_PER_TOKEN[target.backend](target)
