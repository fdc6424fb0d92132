"""Decode speed, size and greedy agreement of the GGUF quants of a ~0.5B-shaped random
LLaVA-Qwen2 model next to the torch reference, measured in one run. A benchmark,
not a test: numbers depend on the machine and its load.

    python bench/bench_gguf.py WORK_DIR [--threads 1] [--new-tokens 64] [--quants F16 Q8_0 Q4_K_M]

The shape and the per-backend measurement (one image + question prefill, then
greedy decode) are bench_onnx.py's, so the two benchmarks compare directly.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx import SHAPE, run_one  # noqa: E402

DEFAULT_QUANTS = ("F16", "Q8_0", "Q4_K_M")


def prepare(work: Path, quants) -> dict:
    """Checkpoint and one GGUF folder per quant (kept between runs); conversion seconds."""
    from huatuo_lite.convert.gguf_export import export_gguf
    from huatuo_lite.convert.tiny import make_tiny

    src = work / "ckpt"
    if not (src / "config.json").is_file():
        make_tiny(src, variant="7b", seed=0, **SHAPE)
    folders, convert_s = {"torch": src}, {}
    for quant in quants:
        folder = work / f"gguf-{quant}"
        if not (folder / "manifest.json").is_file():
            t0 = time.perf_counter()
            export_gguf(src, folder, quant=quant)
            convert_s[quant] = time.perf_counter() - t0
        folders[f"gguf {quant}"] = folder
    return folders, convert_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--quants", nargs="*", default=list(DEFAULT_QUANTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    folders, convert_s = prepare(args.work, args.quants)
    for quant, seconds in convert_s.items():
        print(f"converted {quant} in {seconds:.1f} s", flush=True)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 336, 336)).astype(np.float32)
    rows = []
    for label, folder in folders.items():
        rows.append(run_one(label, folder, args.threads, args.new_tokens, pixels))
        r = rows[-1]
        print(f"{r['backend']:12s} {r['size_mb']:8.1f} MB  prefill {r['prompt_tokens']} tok {r['prefill_s']:6.2f} s  "
              f"decode {r['decode_tok_s']:6.1f} tok/s  image {r['image_encode_s']:.2f} s", flush=True)
    reference = rows[0]["tokens"]
    for r in rows[1:]:
        same = next((i for i, (a, b) in enumerate(zip(r["tokens"], reference)) if a != b), len(reference))
        print(f"{r['backend']:12s} greedy tokens identical to torch for the first {same} of {len(reference)}")
        r["greedy_agrees_with_torch"] = same
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "shape": SHAPE, "convert_s": convert_s,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
