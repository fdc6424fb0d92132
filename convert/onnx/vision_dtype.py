"""How the LLaVA vision graph (vision.onnx) stores its MatMul weights, and the fidelity
gate that lets a smaller graph replace the fp32 one (issue #19 item 4).

  fp32  as the checkpoint, 4 bytes a weight (CLIP-L + projector: 1.2 GB)
  fp16  float16 initializers cast to f32 in the graph, f32 arithmetic (0.6 GB;
        opened with CAST_WEIGHTS_PLAN, backends/vision_onnx.py)
  int8  MatMulNBits, 8-bit blocks of 32 with f32 scales (0.35 GB)
  auto  fp32 written, AUTO_CANDIDATE derived from the checkpoint, both run on the
        PROBES; the candidate replaces fp32 only if every image token's feature
        vector [H] has cosine >= GATE_COSINE to fp32's, else fp32 stays (one line
        on stderr). The choice and the measured gate go into manifest.json.

AUTO_CANDIDATE is the smallest graph with the speed to match (bench/README.md,
"Vision graph dtype"). Everything is written inside the caller's staging folder; the
candidate lives in a scratch folder there until it wins, so an interrupt leaves
nothing half-written in the output.
"""
from __future__ import annotations

import importlib
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from huatuo_lite.errors import HuatuoError

from .vision_stream import COMPUTE_MODE, export_vision_streamed

VISION_DTYPES = ("auto", *COMPUTE_MODE)      # auto, fp32, fp16, int8
AUTO_CANDIDATE = "int8"
GATE_COSINE = 0.999
# models/ installs as huatuo_lite.models (pyproject package-data), in a checkout too
EXAMPLE_IMAGE = Path(importlib.import_module("huatuo_lite.models").__path__[0]) / "examples" / "chest_xray.png"
PROBES = ("gradient", "noise", EXAMPLE_IMAGE.name)


def check_dtype(dtype: str, what: str = "--vision-dtype") -> str:
    if dtype not in VISION_DTYPES:
        raise HuatuoError(f"{what} {dtype!r} is not supported: choose one of {', '.join(VISION_DTYPES)}.")
    return dtype


def probe_pixels(size: int) -> np.ndarray:
    """PROBES as the runtime feeds LLaVA ([3, S, S] float32 each, padded to a square,
    bicubic to `size`, CLIP-normalized: image/load.py), stacked [len(PROBES), 3, S, S]."""
    from PIL import Image

    from huatuo_lite.image.load import fit_llava, load_image, pixel_values

    ramp = np.linspace(0, 255, 448, dtype=np.float32)
    gradient = np.stack([np.add.outer(ramp, ramp[:320]) / 2, np.tile(ramp[:, None], (1, 320)),
                         np.tile(ramp[::-1, None], (1, 320))], axis=-1)              # [448, 320, 3]
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3))
    images = [Image.fromarray(gradient.astype(np.uint8)), Image.fromarray(noise.astype(np.uint8)),
              load_image(EXAMPLE_IMAGE)]
    return np.stack([pixel_values(img, lambda im: fit_llava(im, size)) for img in images])


def token_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Per image token: cosine of the two feature vectors [H] (features [N, T, H]);
    the minimum over every token of every image, and the largest absolute difference."""
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    dot = (ref * cand).sum(-1)
    norms = np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1)
    cosine = np.where(norms > 0, dot / np.maximum(norms, 1e-300), 1.0)          # [N, T]
    return {"min_cosine": round(float(cosine.min()), 6),
            "max_abs_diff": float(np.abs(ref - cand).max())}


def features(path: Path, dtype: str, pixels: np.ndarray, threads: int) -> np.ndarray:
    """The graph's features for `pixels`, opened as the runtime opens a `dtype` graph."""
    from huatuo_lite.backends.vision_onnx import DEFAULT_PLAN, SESSION_PLANS, OnnxVisionEncoder

    encoder = OnnxVisionEncoder(path, threads=threads, plan=SESSION_PLANS.get(("vision", dtype), DEFAULT_PLAN))
    try:
        return encoder.encode(pixels)
    finally:
        encoder.close()


def gate(reference: Path, candidate: Path, dtype: str, size: int, threads: int = 1,
         threshold: float = GATE_COSINE) -> dict:
    """The fidelity gate of `candidate` (a `dtype` graph) against the fp32 `reference`."""
    pixels = probe_pixels(size)
    measured = token_agreement(features(reference, "fp32", pixels, threads),
                               features(candidate, dtype, pixels, threads))
    return {"candidate": dtype, **measured, "threshold": threshold, "probes": list(PROBES),
            "passed": measured["min_cosine"] >= threshold}


def write_vision(ckpt, stage: Path, name: str, dtype: str = "auto", threads: int = 1,
                 threshold: float = GATE_COSINE, block_size: int = 32,
                 force_external_data: bool = False) -> tuple[list[Path], dict]:
    """stage/name (+ .data) in `dtype` (auto: gated, see the module doc). Returns the
    files and the record for the manifest: {"dtype", "requested"[, "gate"]}."""
    check_dtype(dtype)
    path = Path(stage) / name
    if dtype != "auto":
        files = export_vision_streamed(ckpt, path, dtype, block_size, force_external_data)
        return [Path(p) for p in files], {"dtype": dtype, "requested": dtype}
    files = [Path(p) for p in export_vision_streamed(ckpt, path, "fp32", block_size, force_external_data)]
    with tempfile.TemporaryDirectory(prefix=".scratch-", dir=stage) as scratch:
        trial = Path(scratch) / name
        trial_files = [Path(p) for p in export_vision_streamed(ckpt, trial, AUTO_CANDIDATE, block_size,
                                                               force_external_data)]
        record = gate(path, trial, AUTO_CANDIDATE, ckpt.vision.image_size, threads, threshold)
        if not record["passed"]:
            print(f"vision.onnx stays fp32: the {AUTO_CANDIDATE} graph's lowest per-token cosine to fp32 is "
                  f"{record['min_cosine']:.6f} (< {threshold}) on {', '.join(PROBES)}.", file=sys.stderr)
            return files, {"dtype": "fp32", "requested": "auto", "gate": record}
        for old in files:                      # both in the staging folder: nothing reaches OUT_DIR yet
            old.unlink()
        files = [Path(shutil.move(str(p), str(Path(stage) / p.name))) for p in trial_files]
    return files, {"dtype": AUTO_CANDIDATE, "requested": "auto", "gate": record}


__all__ = ["VISION_DTYPES", "AUTO_CANDIDATE", "GATE_COSINE", "PROBES", "check_dtype", "gate",
           "probe_pixels", "token_agreement", "write_vision"]
