"""Decode tokens/s of the 4-bit candidates (bench/quant_candidates.CANDIDATES) on a bench profile.

    python bench/quant_speed.py --profile small --threads 1 --rounds 3 --new-tokens 64 \\
        [--candidates gguf:Q4_0,onnx:int8 | all] [--out speed.json]

quant_candidates.py gives each candidate's fidelity on the demo model, whose 1.6 MB of
weights say nothing about speed; this gives its decode rate on a real shape (the profile's
random-weight checkpoint, bench/profiles.py). Each candidate is converted from the profile's
checkpoint with its CANDIDATES options (quant_candidates.convert) into
WORK/<profile>/candidates/<name>/ and reused later; a candidate whose options are exactly a
profile row's (REUSE) is measured on that row's folder. Then `--rounds` rounds: in each, every
candidate answers the same question about the same image in a fresh bench/measure.py process
(load, image, prefill, greedy decode of --new-tokens with EOS ignored, then a follow-up), the
order rotating by one each round so no candidate always runs first or last on this shared
VM. Reported: median over rounds of the first question's decode tokens/s (and the follow-up's),
the tokens decoded, each round's figure, the language model's size; the load average at start
and end. A benchmark, not a test: the figures belong in bench/README.md, not in code.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import profiles  # noqa: E402
import quant_candidates  # noqa: E402
from quant_candidates import CANDIDATES  # noqa: E402

from huatuo_lite.errors import HuatuoError  # noqa: E402

# The candidates shown by default: what ships (Q4_K_M, the int4 default), the plain
# alternatives compared against it, and the 8-bit anchors. "all": every CANDIDATES entry.
DEFAULT_CANDIDATES = ("gguf:Q8_0", "gguf:Q4_K_M", "gguf:Q4_K_M+imatrix", "gguf:Q4_0",
                      "onnx:int8", "onnx:int4/default-sym-b32", "onnx:int4/k_quant-b32+mixed+embed16",
                      "onnx:int4/rtn-asym-b32", "onnx:int4/hqq-b32")
# candidate -> the profile row converted with exactly its options (bench/profiles.py labels).
# onnx int8: the profile quantizes its fp32 export (quantize_onnx), the candidate exports int8
# directly; both write the same ops (MatMulNBits bits=8, block 32, fp16 embedding table).
REUSE = {"gguf:Q8_0": "gguf Q8_0", "gguf:Q4_K_M": "gguf Q4_K_M", "onnx:int8": "onnx int8"}
# candidate -> the candidate with the same file layout: an imatrix changes which values
# llama.cpp picks, not the tensor types or sizes, so decode does the same work.
SAME_LAYOUT = {"gguf:Q4_K_M+imatrix": "gguf:Q4_K_M", "gguf:Q4_0+imatrix": "gguf:Q4_0"}


def select(spec: str | None) -> list[str]:
    """--candidates -> names in CANDIDATES order; one sentence for an unknown or empty one."""
    if spec is None:
        return list(DEFAULT_CANDIDATES)
    if spec.strip() == "all":
        return list(CANDIDATES)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise HuatuoError("--candidates is empty: name candidates separated by commas, or 'all'.")
    unknown = [name for name in names if name not in CANDIDATES]
    if unknown:
        raise HuatuoError(f"Unknown candidate {unknown[0]!r} in --candidates: choose from "
                          f"{', '.join(CANDIDATES)} (or 'all').")
    return [name for name in CANDIDATES if name in names]


def measured_names(names: list[str]) -> list[str]:
    """The candidates that need their own runs: a SAME_LAYOUT one borrows its twin's figures
    (the twin is measured even when not asked for)."""
    wanted = [SAME_LAYOUT.get(name, name) for name in names]
    return [name for name in CANDIDATES if name in wanted]


def round_order(names: list[str], index: int) -> list[str]:
    """Round `index`'s order: the list rotated by `index`, so over len(names) rounds each
    candidate runs in every position once."""
    shift = index % len(names) if names else 0
    return names[shift:] + names[:shift]


def prepare(profile, work: Path, names: list[str], threads: int, calibration: Path | None) -> dict:
    """{name: (profiles.Target, conversion seconds or None when reused)} for the names to measure;
    the profile's checkpoint and REUSE rows are built by profiles.prepare when missing."""
    rows = [REUSE[name] for name in names if name in REUSE]
    targets, _ = profiles.prepare(profile, work, rows, threads)
    by_label = {target.label: target for target in targets}
    root = Path(work) / profile.name
    found = {}
    for name in names:
        fmt, quant, options = CANDIDATES[name]
        if name in REUSE:
            found[name] = (by_label[REUSE[name]], None)
            continue
        folder = root / "candidates" / quant_candidates.slug(name)
        t0 = time.perf_counter()
        reused = (folder / "manifest.json").is_file()
        if not reused:
            print(f"converting {name} ...", flush=True)
        quant_candidates.convert(root / "ckpt", folder, fmt, quant, options, calibration)
        seconds = None if reused else round(time.perf_counter() - t0, 1)
        if seconds is not None:
            print(f"  converted {name} in {seconds:.0f} s", flush=True)
        found[name] = (profiles.Target(name, fmt, folder, quant if fmt == "gguf" else None), seconds)
    return found


def measure(found: dict, rounds: int, threads: int, new_tokens: int, image: Path) -> dict:
    """{name: [per-round figures]} from alternating rounds of fresh measure.py processes."""
    import run                     # bench/run.py: its child runner (imported late: it loads the bench helpers)

    names, figures = list(found), {name: [] for name in found}
    for index in range(rounds):
        order = round_order(names, index)
        print(f"round {index + 1}/{rounds}: {', '.join(order)}", flush=True)
        for name in order:
            try:
                result = run.run_child(found[name][0], threads, new_tokens, [image])
            except run.CHILD_ERRORS as exc:          # one broken candidate must not end the run
                print(f"  {name} failed: {exc}", flush=True)
                figures[name].append({"error": str(exc)})
                continue
            first, follow = result["first"][0], result["follow_up"][0]
            figures[name].append({"decode_tokens_per_s": first["decode_tokens_per_s"],
                                  "completion_tokens": first["completion_tokens"],
                                  "follow_up_decode_tokens_per_s": follow["decode_tokens_per_s"],
                                  "prompt_tokens": first["prompt_tokens"], "load_s": result["load_s"]})
            print(f"  {name}: decode {first['decode_tokens_per_s']:.2f} tok/s "
                  f"({first['completion_tokens']} tokens), follow-up {follow['decode_tokens_per_s']:.2f}",
                  flush=True)
    return figures


def summarize(names: list[str], found: dict, figures: dict) -> list[dict]:
    """One row per asked-for name: medians over the rounds that ran."""
    rows = []
    for name in names:
        source = SAME_LAYOUT.get(name, name)
        target, seconds = found[source]
        done = [entry for entry in figures[source] if "error" not in entry]
        row = {"candidate": name, "measured_as": source, "folder": str(target.folder), "rounds": len(done),
               "convert_s": seconds, "text_mb": quant_candidates.text_size(target.folder, target.backend) / 2**20,
               "per_round": [entry.get("decode_tokens_per_s") for entry in figures[source]]}
        for key in ("decode_tokens_per_s", "follow_up_decode_tokens_per_s", "completion_tokens"):
            row[key] = statistics.median(entry[key] for entry in done) if done else None
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| candidate | decode tok/s (median) | follow-up decode tok/s | tokens decoded | rounds "
             "| per round | text MB |", "|---|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        name = row["candidate"] + ("" if row["measured_as"] == row["candidate"] else f" (= {row['measured_as']})")
        rates = ", ".join("-" if rate is None else f"{rate:.2f}" for rate in row["per_round"])
        if row["decode_tokens_per_s"] is None:
            lines.append(f"| {name} | failed | - | - | 0 | {rates} | {row['text_mb']:.0f} |")
            continue
        lines.append(f"| {name} | {row['decode_tokens_per_s']:.2f} | {row['follow_up_decode_tokens_per_s']:.2f} "
                     f"| {row['completion_tokens']:.0f} | {row['rounds']} | {rates} | {row['text_mb']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="small", choices=sorted(profiles.PROFILES))
    parser.add_argument("--candidates", help=f"comma-separated names or 'all' (default: {', '.join(DEFAULT_CANDIDATES)})")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every candidate (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="1: this VM's 2 cores are shared")
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded per question (default: the profile's)")
    parser.add_argument("--calibration", type=Path, help="training-split records for the calibrated candidates")
    parser.add_argument("--work", type=Path, default=None, help="models are built (and kept) here "
                        "(default: bench/run.py's, ~/.cache/huatuo-lite-bench)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or (args.new_tokens is not None and args.new_tokens < 2):
        parser.error("--rounds and --threads must be at least 1 and --new-tokens at least 2.")
    try:
        args.names = select(args.candidates)
    except HuatuoError as exc:
        parser.error(str(exc))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import run

    profile = profiles.get_profile(args.profile)
    work = args.work or run.DEFAULT_WORK
    new_tokens = args.new_tokens or profile.new_tokens
    load_start = os.getloadavg()
    print(f"profile {profile.name}: {profile.about}; threads {args.threads}; {new_tokens} new tokens; "
          f"load average {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}", flush=True)
    found = prepare(profile, work, measured_names(args.names), args.threads, args.calibration)
    image = run.write_images(Path(work) / "images", 1)[0]
    figures = measure(found, args.rounds, args.threads, new_tokens, image)
    rows = summarize(args.names, found, figures)
    load_end = os.getloadavg()
    print(f"\nload average at the end {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}\n\n"
          + render(rows), flush=True)
    result = {"profile": profile.name, "threads": args.threads, "new_tokens": new_tokens, "rounds": args.rounds,
              "image": str(image), "load_average": load_start, "load_average_end": load_end, "rows": rows}
    if args.out:
        run.write_json(args.out, result)
    return result


if __name__ == "__main__":
    try:
        main()
    except HuatuoError as exc:
        sys.exit(str(exc))
