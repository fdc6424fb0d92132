"""The libmtmd self-test on the CPU and on the GPU, for native/gpu_check.sh.

huatuo_lite's own self-test (backends/gguf_mtmd.mtmd_self_test) runs libmtmd on the CPU only.
This one runs the same comparison twice with the libraries llama-cpp-python loads now
(LLAMA_CPP_LIB_PATH / MTMD_CPP_LIB): libmtmd's image features of a fixed random image,
[T=576, H] per image, against vision.onnx's, once with use_gpu=False and once with
use_gpu=True, and records which backend libmtmd's CLIP said it used (its own log line
"CLIP using <name> backend"), so a run that silently fell back to the CPU is seen.

    python native/gpu_selftest.py GGUF_FOLDER [--json OUT.json]

Prints the JSON; exit 0 when every run passed (min per-token cosine >= 0.999), 1 when one
failed, 2 for a bad argument.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
from pathlib import Path

BACKEND_LINE = re.compile(r"CLIP using (\S+) backend")


def _paths(folder: Path) -> tuple[Path, Path, Path]:
    """(text GGUF, mmproj, vision.onnx) of a converted folder, from its manifest."""
    from huatuo_lite.backends.gguf import _pick_text
    from huatuo_lite.manifest import files_with_role, read_manifest

    manifest = read_manifest(folder)
    mmproj = files_with_role(folder, manifest, "mmproj")
    vision = files_with_role(folder, manifest, "vision")
    if not mmproj or not vision:
        raise SystemExit(f"gpu_selftest: {folder} has no mmproj or no vision.onnx; "
                         "give a GGUF folder converted with images (e.g. models/demo/gguf).")
    return _pick_text(folder, manifest, None), mmproj[0], vision[0]


class _MtmdLog:
    """Collects libmtmd's log lines (its CLIP backend choice is logged at info level)."""

    def __init__(self):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self.lines: list[str] = []

        @llama_cpp.llama_log_callback
        def collect(level, text, user_data):
            self.lines.append(text.decode("utf-8", errors="replace"))

        self._callback = collect   # kept alive: libmtmd holds the pointer
        setter = getattr(mtmd_cpp, "mtmd_log_set", None)
        if setter is not None:
            setter(collect, ctypes.c_void_p(0))

    def backend(self, since: int) -> str | None:
        found = BACKEND_LINE.findall("".join(self.lines[since:]))
        return found[-1] if found else None


def run(folder: Path, threads: int = 1) -> dict:
    import llama_cpp
    import numpy as np

    from huatuo_lite.backends.gguf_mtmd import (SELF_TEST_MIN_COSINE, MtmdEncoder, self_test_pixels,
                                                token_cosines)
    from huatuo_lite.backends.gguf_llama import load_model
    from huatuo_lite.backends.vision_onnx import OnnxVisionEncoder

    text, mmproj, vision = _paths(folder)
    log = _MtmdLog()
    llama_cpp.llama_backend_init()
    reference_encoder = OnnxVisionEncoder(vision, threads=threads)
    pixels = self_test_pixels(reference_encoder.image_size)   # [1, 3, S, S]
    reference = reference_encoder.encode(pixels)               # [1, T, H]
    reference_encoder.close()
    model = load_model(text, gpu_layers=0, vocab_only=True)    # libmtmd reads n_embd + vocab only
    report: dict = {"llama_cpp_python": llama_cpp.__version__, "threshold": SELF_TEST_MIN_COSINE,
                    "mmproj": mmproj.name}
    features = {}
    try:
        for name, use_gpu in (("cpu", False), ("gpu", True)):
            since = len(log.lines)
            encoder = MtmdEncoder(mmproj, model, reference.shape[-1], threads, use_gpu=use_gpu)
            try:
                features[name] = encoder.encode(pixels)         # [1, T, H]
            finally:
                encoder.close()
            report[name] = _verdict(features[name], reference, token_cosines, SELF_TEST_MIN_COSINE)
            report[name]["backend"] = log.backend(since)
    finally:
        llama_cpp.llama_model_free(model)
    if features["cpu"].shape == features["gpu"].shape:
        report["gpu_vs_cpu_min_cosine"] = round(float(np.min(token_cosines(features["gpu"], features["cpu"]))), 6)
    report["passed"] = bool(report["cpu"]["passed"] and report["gpu"]["passed"])
    return report


def _verdict(features, reference, token_cosines, threshold: float) -> dict:
    if features.shape != reference.shape:
        return {"passed": False, "error": f"libmtmd gave {list(features.shape)}, expected {list(reference.shape)}"}
    cos = token_cosines(features, reference)
    return {"passed": bool(cos.min() >= threshold), "min_cosine": round(float(cos.min()), 6),
            "mean_cosine": round(float(cos.mean()), 6)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a converted GGUF folder with mmproj and vision.onnx")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not (args.folder / "manifest.json").is_file():
        parser.error(f"{args.folder} is not a converted model folder (no manifest.json); "
                     "give e.g. models/demo/gguf.")
    report = run(args.folder, args.threads)
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
