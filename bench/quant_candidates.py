"""4-bit candidates side by side: convert the demo (or any upstream folder) with every
candidate, run `eval --compare` against the torch reference, print one table.

    python bench/quant_data.py DATA      # the validation split and calibration records (seed 0)
    python bench/quant_candidates.py models/demo/checkpoint DATA/val/eval/eval.json OUT \\
        --calibration DATA/train_conversations.json [--only onnx|gguf] [--candidates a,b]

Columns: accuracy, Δ vs reference (points), agreement with the reference's letter,
mean first-token KL(reference || candidate), size of the language model's files
(ONNX: decoder + embed graphs and data; GGUF: the text GGUF) and the candidate's
settings. Converted folders are kept under OUT/models/ and reused; eval runs under
OUT/eval-<split>/ (resumable), so the same OUT serves a validation
and a test split. Pick on validation, report on test (issue #21).

Calibration records (GPTQ, GGUF imatrix) must come from the training split, never
from the questions scored.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# name -> (format, quant, converter options). ONNX int4 options: onnx_algorithms.
CANDIDATES = {
    "onnx:int8": ("onnx", "int8", {}),
    "onnx:int4/default-sym-b32": ("onnx", "int4", {"algorithm": "default", "symmetric": True}),
    "onnx:int4/default-asym-b32": ("onnx", "int4", {"algorithm": "default", "symmetric": False}),
    "onnx:int4/default-sym-b16": ("onnx", "int4", {"algorithm": "default", "symmetric": True, "block_size": 16}),
    "onnx:int4/default-sym-b64": ("onnx", "int4", {"algorithm": "default", "symmetric": True, "block_size": 64}),
    "onnx:int4/rtn-asym-b32": ("onnx", "int4", {"algorithm": "rtn", "symmetric": False}),
    "onnx:int4/k_quant-b32": ("onnx", "int4", {"algorithm": "k_quant"}),
    "onnx:int4/k_quant-b16": ("onnx", "int4", {"algorithm": "k_quant", "block_size": 16}),
    "onnx:int4/hqq-b32": ("onnx", "int4", {"algorithm": "hqq"}),
    "onnx:int4/gptq-sym-b32": ("onnx", "int4", {"algorithm": "gptq", "symmetric": True, "calibrated": True}),
    "onnx:int4/gptq-asym-b32": ("onnx", "int4", {"algorithm": "gptq", "symmetric": False, "calibrated": True}),
    "onnx:int4/default-sym-b32+lm_head": ("onnx", "int4", {"algorithm": "default", "symmetric": True,
                                                            "keep_int8": "lm_head"}),
    "onnx:int4/k_quant-b32+lm_head": ("onnx", "int4", {"algorithm": "k_quant", "keep_int8": "lm_head"}),
    "onnx:int4/k_quant-b32+mixed": ("onnx", "int4", {"algorithm": "k_quant", "keep_int8": "mixed"}),
    "onnx:int4/hqq-b32+mixed": ("onnx", "int4", {"algorithm": "hqq", "keep_int8": "mixed"}),
    "onnx:int4/default-sym-b32+embed16": ("onnx", "int4", {"algorithm": "default", "symmetric": True,
                                                            "embed_quant": "fp16"}),
    "onnx:int4/k_quant-b32+embed16": ("onnx", "int4", {"algorithm": "k_quant", "embed_quant": "fp16"}),
    "onnx:int4/k_quant-b32+lm_head+embed16": ("onnx", "int4", {"algorithm": "k_quant", "keep_int8": "lm_head",
                                                                "embed_quant": "fp16"}),
    "onnx:int4/k_quant-b32+mixed+embed16": ("onnx", "int4", {"algorithm": "k_quant", "keep_int8": "mixed",
                                                              "embed_quant": "fp16"}),
    "gguf:Q8_0": ("gguf", "Q8_0", {}),
    "gguf:Q4_K_M": ("gguf", "Q4_K_M", {}),
    "gguf:Q4_K_M+imatrix": ("gguf", "Q4_K_M", {"calibrated": True}),
    "gguf:Q4_0": ("gguf", "Q4_0", {}),
    "gguf:Q4_0+imatrix": ("gguf", "Q4_0", {"calibrated": True}),
}
TEXT_ROLES = {"onnx": ("decoder", "embed", "data"), "gguf": ("text",)}


def slug(name: str) -> str:
    return name.replace(":", "-").replace("/", "-").replace("+", "-")


def convert(src: Path, folder: Path, fmt: str, quant: str, options: dict, calibration: Path | None) -> Path:
    """The candidate's converted folder (reused when its manifest exists)."""
    if (folder / "manifest.json").is_file():
        return folder
    options = dict(options)
    calibrated = options.pop("calibrated", False)
    if calibrated and calibration is None:
        raise SystemExit(f"{folder.name} needs --calibration (training-split records).")
    if fmt == "onnx":
        from huatuo_lite.convert.onnx.export import export_onnx

        if quant == "int4":      # a candidate names what it changes; the rest is plain int4, not the default
            options = {"keep_int8": "none", "embed_quant": "int4", **options}
        export_onnx(src, folder, quant=quant, calibration=calibration if calibrated else None, **options)
    else:
        from huatuo_lite.convert.gguf.export import export_gguf

        export_gguf(src, folder, quant=quant, imatrix=calibration if calibrated else None, **options)
    return folder


def text_size(folder: Path, fmt: str) -> int:
    """Bytes of the language model's files (the vision side is the same for every candidate)."""
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    names = [n for n, e in manifest["files"].items() if e.get("role") in TEXT_ROLES[fmt]
             and (fmt == "gguf" or not n.startswith("vision"))]
    return sum((folder / n).stat().st_size for n in names)


def table(rows: list, sizes: dict) -> str:
    ref = rows[0]["accuracy"]
    lines = ["| candidate | n | accuracy % | Δ vs reference | agreement % | mean KL | text size (KB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = sizes.get(r["spec"])
        lines.append(f"| {r['spec']} | {r['count']} | {100 * r['accuracy']:.1f} | {100 * (r['accuracy'] - ref):+.1f} "
                     f"| {100 * r['agreement']:.1f} | {r['mean_kl']:.2e} | {size / 1024:.0f} |" if size else
                     f"| {r['spec']} | {r['count']} | {100 * r['accuracy']:.1f} | +0.0 | 100.0 | 0 | - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="upstream checkpoint folder (the torch reference)")
    parser.add_argument("data", type=Path, help="eval JSON (validation split to choose, test split to report)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--calibration", type=Path, help="training-split records for gptq and the imatrix")
    parser.add_argument("--split", help="name of the split for OUT's eval folder and table (default: the data "
                        "file's folder name)")
    parser.add_argument("--only", choices=("onnx", "gguf"))
    parser.add_argument("--candidates", help="comma-separated names (default: all)")
    args = parser.parse_args(argv)

    from huatuo_lite.eval.fidelity import Spec, compare

    names = args.candidates.split(",") if args.candidates else list(CANDIDATES)
    names = [n for n in names if not args.only or CANDIDATES[n][0] == args.only]
    specs, sizes = [Spec("reference", "torch", None, args.src)], {}
    for name in names:
        fmt, quant, options = CANDIDATES[name]
        folder = convert(args.src, args.out / "models" / slug(name), fmt, quant, options, args.calibration)
        specs.append(Spec(name, fmt, quant, folder))
        sizes[name] = text_size(folder, fmt)
    split = args.split or args.data.parent.name
    rows = compare(specs, args.data, args.out / f"eval-{split}", progress=False)
    text = table(rows, sizes)
    (args.out / f"candidates-{split}.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
