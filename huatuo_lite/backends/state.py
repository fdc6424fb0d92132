"""What the engines share for the persistent prefix cache (huatuo_lite/cache.py):
the identity of a model file, and the cut points at which a kept KV prefix gives
the very numbers of a cold prefill."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .base import ImageEmbeds


def file_identity(folder: Path, manifest: dict, name: str) -> dict:
    """A model file as the cache keys it: the manifest's sha256 and quant, and the file's
    size and mtime (a file replaced by hand without a new manifest still misses)."""
    entry = manifest.get("files", {}).get(name, {})
    try:
        st = (Path(folder) / name).stat()
        stat = [st.st_size, st.st_mtime_ns]
    except OSError:
        stat = None
    return {"name": name, "sha256": entry.get("sha256"), "quant": entry.get("quant"), "stat": stat}


def segment_boundary(segments: Sequence, n: int) -> int:
    """The largest start of a segment that is <= n: engines keep whole segments only,
    since each segment is fed as its own batches (a cut inside one would batch its
    rest differently than a cold prefill does, and change the numbers in the last bits)."""
    start = best = 0
    for seg in segments:
        if start > n:
            break
        best = start
        start += len(seg.features) if isinstance(seg, ImageEmbeds) else len(seg)
    return n if n == start else best
