"""Side-by-side benchmark of every backend and quant on a real-shaped random model.

    python bench/run.py --profile small [--threads N] [--repeat 4] [--out small.json]

Profiles (bench/profiles.py): tiny (seconds; the smoke test), small (Qwen2-0.5B-shaped
decoder + CLIP ViT-L/14-336), 7b (Qwen2-7B shape; manual: ~16 GB checkpoint, long).
Rows: torch fp32 reference, GGUF F16/Q8_0/Q4_K_M, ONNX fp32/int8/int4, each in its own
process (its peak RSS is its own), and stock llama.cpp (llama-bench, llama-mtmd-cli) on
the same GGUF files when built. A GGUF row and its stock peer run in rounds of one image
each, whichever goes first alternating (bench/rounds.py): an even --repeat is fairest.
Per row: load time, image encode, prefill tokens/s, time to first token, decode tokens/s and its fraction of the memory-bandwidth roofline, the
follow-up question's TTFT on the same image (feature cache + KV prefix reuse), peak RSS.
Prints a markdown table; writes JSON with --out. A benchmark, not a test: run it on a
quiet machine (the load average is recorded) and repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import profiles  # noqa: E402
import report  # noqa: E402
import roofline  # noqa: E402
import rounds  # noqa: E402
import stock  # noqa: E402
from measure import FIRST_QUESTION  # noqa: E402

DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huatuo-lite-bench"
ROW_TIMEOUT_S = 4 * 3600      # one backend's process (the 7B fp32 reference is slow)
CHILD_ERRORS = (RuntimeError, subprocess.TimeoutExpired, ValueError)   # a child's failures (run_child)


def default_threads() -> int:
    from huatuo_lite.backends.gguf_files import physical_cores   # the backends' own default

    return physical_cores()


def write_images(folder: Path, count: int) -> list[Path]:
    """One random 336x336 RGB PNG per repeat (different pixels: no cache hit across repeats)."""
    import numpy as np
    from PIL import Image

    from huatuo_lite.families.llava import IMAGE_SIZE

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"random-{index}.png"
        if not path.is_file():
            pixels = np.random.default_rng(index).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            tmp = path.with_suffix(".tmp.png")
            Image.fromarray(pixels).save(tmp)
            tmp.replace(path)
        paths.append(path)
    return paths


def folder_size_mb(target) -> float:
    """Model files on disk: the checkpoint's shards, or a converted folder's manifest entries."""
    if target.backend == "torch":
        return sum(p.stat().st_size for p in target.folder.glob("*.safetensors")) / 2**20
    from huatuo_lite.manifest import read_manifest

    return sum(e["size"] for e in read_manifest(target.folder)["files"].values()) / 2**20


def run_child(target, threads: int, new_tokens: int, images: list[Path]) -> dict:
    """bench/measure.py in a fresh process; its last stdout line is the JSON result."""
    spec = {"backend": target.backend, "folder": str(target.folder), "quant": target.quant,
            "threads": threads, "new_tokens": new_tokens, "images": [str(p) for p in images]}
    env = {**os.environ, **{var: str(threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                          "OPENBLAS_NUM_THREADS")}}
    done = subprocess.run([sys.executable, str(BENCH_DIR / "measure.py"), json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=ROW_TIMEOUT_S, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-4:])
        raise RuntimeError(f"exit code {done.returncode}: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_targets(targets, args, images, read_gbs: float) -> tuple[list[dict], list[str]]:
    """Our rows; each GGUF row paired with stock llama.cpp on the same file, in alternating
    rounds (bench/rounds.py: which of the two ran first moved their ratio here)."""
    rows, notes = [], []
    for target in targets:
        paired = target.backend == "gguf" and not args.no_stock
        more_rows, more_notes = (measure_paired(target, args, images, read_gbs) if paired
                                 else measure_ours(target, args, images, read_gbs))
        rows, notes = rows + more_rows, notes + more_notes
        if args.out:     # what is measured so far survives a later crash
            write_json(args.out.with_name(args.out.name + ".partial"), {"rows": rows, "notes": notes})
    return rows, list(dict.fromkeys(notes))


def measure_ours(target, args, images: list[Path], read_gbs: float) -> tuple[list[dict], list[str]]:
    """Our row from one bench/measure.py child that asks about every image."""
    print(f"measuring {target.label} ...", flush=True)
    try:
        return [finish_ours(target, run_child(target, args.threads, args.new_tokens, images), read_gbs)], []
    except CHILD_ERRORS as exc:
        return [], [failed(target, exc)]


def failed(target, exc) -> str:
    """The note for a row whose child failed, printed at once (one broken row must not
    hide the others: the run goes on)."""
    note = f"{target.label} failed: {exc}"
    print(f"  {note}", flush=True)
    return note


def finish_ours(target, measured: dict, read_gbs: float) -> dict:
    """A child's result (or rounds.merge_children of several) -> our table row with its size
    and roofline."""
    row = report.summarize(measured)
    row.update(label=target.label, backend=target.backend, quant=target.quant,
               folder=str(target.folder), size_mb=folder_size_mb(target))
    report.add_roofline(row, roofline.bytes_per_token(target), read_gbs)
    print(f"  {target.label}: TTFT {row['time_to_first_token_s']:.2f} s, decode {row['decode_tokens_per_s']:.2f} "
          f"tok/s, follow-up TTFT x{row['follow_up_ratio']:.3f}, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    return row


def finish_stock(target, row: dict, read_gbs: float) -> dict:
    """A stock llama.cpp row (medians over rounds) -> with the file's size and roofline."""
    row["size_mb"] = folder_size_mb(target)
    report.add_roofline(row, roofline.bytes_per_token(target), read_gbs)
    print(f"  {row['label']}: TTFT {row.get('time_to_first_token_s', float('nan')):.2f} s, "
          f"decode {row['decode_tokens_per_s']:.2f} tok/s (llama-bench)", flush=True)
    return row


def measure_paired(target, args, images, read_gbs: float) -> tuple[list[dict], list[str]]:
    """Ours and stock llama.cpp, one image per round, the order flipping every round. Stock
    decodes at our prompt's depth, known after our first round (round 0 runs ours first).
    Each row keeps its per-round figures (per_round) beside the medians."""
    ours_parts, stock_parts, notes = [], [], []
    for index, order in enumerate(rounds.round_orders(len(images))):
        print(f"round {index + 1}/{len(images)} on {target.label}: {' then '.join(order)}", flush=True)
        for peer in order:
            if peer == rounds.OURS:
                try:
                    ours_parts.append(run_child(target, args.threads, args.new_tokens, [images[index]]))
                except CHILD_ERRORS as exc:
                    return [], [failed(target, exc)]
                print_round("ours", ours_parts[-1]["first"][0])
            else:
                depth = ours_parts[-1]["first"][0]["prompt_tokens"]
                found, found_notes = stock.stock_rows([target], [images[index]], FIRST_QUESTION, args.threads,
                                                      args.new_tokens, 1, depth, mtmd=not args.no_mtmd)
                stock_parts, notes = stock_parts + found, notes + found_notes
                for row in found:
                    print_round("stock", row)
    rows = [finish_ours(target, rounds.merge_children(ours_parts), read_gbs)]
    rows[0]["per_round"] = rounds.per_round([part["first"][0] for part in ours_parts])
    if stock_parts:
        rows.append(finish_stock(target, rounds.median_rows(stock_parts), read_gbs))
        rows[1]["per_round"] = rounds.per_round(stock_parts)
    for row in rows:
        row["interleaved_rounds"] = len(images)
    return rows, notes


def print_round(peer: str, figures: dict) -> None:
    print(f"  {peer}: TTFT {figures.get('time_to_first_token_s', float('nan')):.2f} s, "
          f"decode {figures.get('decode_tokens_per_s', float('nan')):.2f} tok/s", flush=True)


def chosen_labels(profile, only: list[str] | None) -> list[str]:
    labels = profiles.all_labels(profile)
    if not only:
        return profiles.default_labels(profile)
    unknown = [label for label in only if label not in labels]
    if unknown:
        raise SystemExit(f"Unknown row {unknown[0]!r}: choose from {', '.join(labels)}.")
    return [label for label in labels if label in only]


def benchmark(args) -> dict:
    profile = profiles.get_profile(args.profile)
    args.new_tokens = args.new_tokens or profile.new_tokens
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"profile {profile.name}: {profile.about}; threads {args.threads}; load average {load_average}",
          flush=True)
    bandwidth = roofline.measure_bandwidth(args.threads)
    print(f"memory bandwidth: read {bandwidth['read_gbs']:.1f} GB/s ({bandwidth['method']})", flush=True)
    t0 = time.perf_counter()
    targets, built = profiles.prepare(profile, args.work, chosen_labels(profile, args.only), args.threads)
    images = write_images(Path(args.work) / "images", args.repeat)
    rows, notes = measure_targets(targets, args, images, bandwidth["read_gbs"])
    report.add_agreement(rows)
    return {"profile": profile.name, "about": profile.about, "sizes": profile.sizes, "threads": args.threads,
            "repeat": args.repeat, "new_tokens": args.new_tokens, "load_average": load_average,
            "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "bandwidth": bandwidth, "built_s": built, "rows": rows,
            "notes": notes, "wall_s": time.perf_counter() - t0}


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="small", choices=sorted(profiles.PROFILES))
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--repeat", type=int, default=4,
                        help="questions per row (medians reported); even: paired rounds alternate who goes first")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: the profile's")
    parser.add_argument("--only", nargs="*", help="rows to run, e.g. 'gguf Q4_K_M' 'torch fp32'")
    parser.add_argument("--no-stock", action="store_true", help="skip stock llama.cpp")
    parser.add_argument("--no-mtmd", action="store_true",
                        help="stock TTFT without llama-mtmd-cli (no image encode: prefill at llama-bench's rate)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="models are built (and kept) here")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    args.threads = args.threads or default_threads()
    if args.repeat < 1 or args.threads < 1:
        parser.error("--repeat and --threads must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = benchmark(args)
    print("\n" + report.render(result), flush=True)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
