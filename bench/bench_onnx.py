"""Decode speed and file sizes of the ONNX fp32/int8/int4 exports of a ~0.5B-shaped
random LLaVA-Qwen2 model, next to the torch reference and the GGUF backend,
measured in one run. A benchmark, not a test: numbers depend on the machine.

    python bench/bench_onnx.py WORK_DIR [--threads 1] [--new-tokens 64] [--json out.json]

Shape (default): Qwen2 text hidden 1024, 24 layers, 16 heads / 2 KV heads,
intermediate 4864 (~0.42B text parameters; the tiny tokenizer keeps the
vocabulary at ~1.5k rows, so the 0.5B model's 136M-parameter lm_head is absent),
a 2-layer CLIP-shaped tower (336 px, 576 image tokens).
Each backend: one image + question prefill, then greedy decode of N tokens.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SHAPE = dict(hidden_size=1024, intermediate_size=4864, num_layers=24, num_heads=16, num_kv_heads=2,
             vision_hidden_size=256, vision_intermediate_size=512, vision_layers=3, vision_heads=4)
ONNX_QUANTS = ("fp32", "int8", "int4")
GGUF_QUANTS = ("F16", "Q8_0", "Q4_K_M")


def folder_size(folder: Path, roles=None) -> int:
    manifest = json.loads((folder / "manifest.json").read_text())
    return sum(e["size"] for e in manifest["files"].values() if roles is None or e["role"] in roles)


def prepare(work: Path) -> dict:
    """Checkpoint, ONNX folders and GGUF folders (skipped when already there)."""
    from huatuo_lite.convert.gguf_export import export_gguf
    from huatuo_lite.convert.onnx_export import export_onnx, quantize_onnx
    from huatuo_lite.convert.tiny import make_tiny

    src = work / "ckpt"
    if not (src / "config.json").is_file():
        make_tiny(src, variant="7b", seed=0, **SHAPE)
    folders = {"torch": src}
    if not (work / "onnx-fp32" / "manifest.json").is_file():
        export_onnx(src, work / "onnx-fp32", quant="fp32")
    for quant in ONNX_QUANTS:
        folder = work / f"onnx-{quant}"
        if not (folder / "manifest.json").is_file():
            quantize_onnx(work / "onnx-fp32", folder, quant=quant)
        folders[f"onnx {quant}"] = folder
    for quant in GGUF_QUANTS:
        folder = work / f"gguf-{quant}"
        if not (folder / "manifest.json").is_file():
            export_gguf(src, folder, quant=quant)
        folders[f"gguf {quant}"] = folder
    return folders


def run_one(label: str, folder: Path, threads: int, new_tokens: int, pixels: np.ndarray) -> dict:
    from huatuo_lite.backends import load_backend
    from huatuo_lite.prompt import Turn, build_segments

    backend = label.split()[0]
    t0 = time.perf_counter()
    engine = load_backend(backend).open_engine(folder, threads=threads)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    features = engine.encode_images(pixels)
    encode_s = time.perf_counter() - t0
    segments = build_segments([Turn("Describe the image.", n_images=1)], engine.tokenize, list(features))
    t0 = time.perf_counter()
    logits = engine.prefill(segments)
    prefill_s = time.perf_counter() - t0
    tokens = []
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        tokens.append(int(np.argmax(logits)))
        logits = engine.step(tokens[-1])
    decode_s = time.perf_counter() - t0
    engine.close()
    size = folder_size(folder) if label != "torch" else sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"backend": label, "size_mb": size / 2**20, "load_s": load_s, "image_encode_s": encode_s,
            "prefill_s": prefill_s, "prompt_tokens": sum(len(s) if isinstance(s, list) else len(s.features)
                                                         for s in segments),
            "decode_tok_s": new_tokens / decode_s, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--only", nargs="*", help="labels to run, e.g. 'onnx int4' torch")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    folders = prepare(args.work)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 336, 336)).astype(np.float32)
    rows = []
    for label, folder in folders.items():
        if args.only and label not in args.only:
            continue
        try:
            rows.append(run_one(label, folder, args.threads, args.new_tokens, pixels))
        except Exception as exc:   # one broken backend must not hide the others' numbers
            print(f"{label:12s} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        r = rows[-1]
        print(f"{r['backend']:12s} {r['size_mb']:8.1f} MB  prefill {r['prompt_tokens']} tok {r['prefill_s']:6.2f} s  "
              f"decode {r['decode_tok_s']:6.1f} tok/s  image {r['image_encode_s']:.2f} s", flush=True)
    reference = next((r["tokens"] for r in rows if r["backend"] == "torch"), None)
    for r in rows:   # greedy tokens equal to the reference's before the first difference
        r["greedy_same_as_torch"] = None if reference is None else \
            next((i for i, (a, b) in enumerate(zip(r["tokens"], reference)) if a != b), len(reference))
        print(f"{r['backend']:12s} greedy tokens equal to torch's: {r['greedy_same_as_torch']}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "shape": SHAPE, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
