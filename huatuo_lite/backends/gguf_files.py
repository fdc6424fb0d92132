"""Which files of a converted GGUF folder to open, and the checks that name a file that does
not belong: the text GGUF of a quant, the mmproj's width, and the default thread count
(the vision.onnx fallback is vision_onnx.LazyVision)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelFormatError
from ..manifest import files_with_role
from .gguf_llama import read_gguf_metadata

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
