"""Which files of a converted GGUF folder to open, and the checks that name a file that does
not belong: the text GGUF of a quant, the mmproj's width, the vision.onnx fallback (opened
lazily), and the default thread count."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError
from ..manifest import files_with_role
from .gguf_llama import read_gguf_metadata
from .vision_onnx import OnnxVisionEncoder

# which text GGUF a folder holding several quants opens by default: small and good first
QUANT_PREFERENCE = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "F16", "BF16", "F32")
PROJECTION_DIM_KEY = "clip.vision.projection_dim"


def physical_cores() -> int:
    """Physical cores (llama.cpp gains nothing from hyper-threads); else half the CPU count."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    cores, physical = set(), None
    for key, _, value in (line.partition(":") for line in lines):
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or max(1, (os.cpu_count() or 2) // 2)


def pick_text(folder: Path, manifest: dict, quant: str | None) -> Path:
    """The text GGUF of `quant`, or (none asked) the first of QUANT_PREFERENCE the folder holds."""
    entries = {name: e for name, e in manifest.get("files", {}).items() if e.get("role") == "text"}
    chosen = [n for n, e in entries.items() if quant is None or str(e.get("quant", "")).upper() == quant.upper()]
    if not chosen:
        have = ", ".join(sorted(str(e.get("quant")) for e in entries.values())) or "none"
        raise ModelFormatError(f"{folder} has no {quant} text GGUF (it has: {have}); "
                               f"pick one of those or convert with --quant {quant}.")
    rank = {q: i for i, q in enumerate(QUANT_PREFERENCE)}
    return folder / min(chosen, key=lambda n: (rank.get(str(entries[n].get("quant")).upper(), len(rank)), n))


def check_mmproj(folder: Path, manifest: dict, n_embd: int) -> Path | None:
    """The mmproj must project to the text width: a swapped-in file from another model is named."""
    mmprojs = files_with_role(folder, manifest, "mmproj")
    for path in mmprojs:
        width = read_gguf_metadata(path).get(PROJECTION_DIM_KEY)
        if width != n_embd:
            raise ModelFormatError(
                f"{path.name} projects images to width {width} but the text model has {n_embd}: it belongs to "
                f"another model; put back the mmproj converted with this model ({path.name} from the same "
                "`huatuo-lite convert gguf` run).")
    return mmprojs[0] if mmprojs else None


def check_vision(path: Path, n_embd: int, threads: int):
    encoder = OnnxVisionEncoder(path, threads=threads)
    if encoder.hidden_size != n_embd:
        encoder.close()
        raise ModelFormatError(
            f"{path.name} produces image features of width {encoder.hidden_size} but the text model has "
            f"{n_embd}: it belongs to another model; put back the vision.onnx converted with this model.")
    return encoder


class LazyVision(OnnxVisionEncoder):
    """vision.onnx, opened at the first image that is not in the cache: a question answered
    from the disk cache never pays its session (CLIP-L: 1.2 GB of fp32 weights read).
    An OnnxVisionEncoder to its users; the session is the wrapped one's."""

    def __init__(self, path: Path, width: int, threads: int):   # no session yet (no super().__init__)
        self.path, self.width, self.threads = path, width, threads
        self._encoder = None

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        if self._encoder is None:
            self._encoder = check_vision(self.path, self.width, self.threads)
        return self._encoder.encode(pixel_values)

    def close(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
