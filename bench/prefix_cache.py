"""The disk cache across processes (issue #19): every figure is a whole `huatuo-lite`
process, timed from spawn to exit, as a user in a shell waits for it.

    python bench/prefix_cache.py --profile small --rows "gguf Q8_0" "onnx int8" --repeat 2
    python bench/prefix_cache.py --profile demo --repeat 4        # the bundled demo folders
    python bench/prefix_cache.py --profile tiny --repeat 1 --batch

Per row and round (a new image and an empty cache folder each round):
  first   `ask IMAGE Q1`: cold, writes the image features and the prefix KV state
  second  `ask IMAGE Q2` in a new process: loads them          goal: <= 0.15x first's wall
  cold    `--no-cache ask IMAGE Q2`: the answer `second` must equal
second and cold alternate which runs first (odd rounds second first). With --batch, also one
`batch` of 10 questions over 2 images (cache empty at start) against 10 cold `--no-cache` asks
of the same questions, answers compared. Then the size of each entry on disk and one eviction
check under a cap of 2.5 prefix entries. The load average is printed at start and end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profiles                        # noqa: E402  (bench/ is not a package)
from run import DEFAULT_WORK, write_images   # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
Q1, Q2 = "Describe the findings in this image.", "Is there any sign of an abnormality?"
BATCH_QUESTIONS = ("Describe the findings in this image.", "Is there any sign of an abnormality?",
                   "Which organ is shown?", "Is this image normal?", "What modality is this?")
DEMO_ROWS = {"gguf demo": ROOT / "models" / "demo" / "gguf", "onnx demo": ROOT / "models" / "demo" / "onnx"}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cli(args: list, cache: Path, threads: int, no_cache: bool = False) -> tuple[float, dict | str]:
    """One huatuo-lite process; (wall seconds, parsed --json output or stdout)."""
    env = {**os.environ, "HUATUO_LITE_CACHE": str(cache), "HUATUO_LITE_NO_NOTICE": "1",
           **{v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    env.pop("HUATUO_LITE_NO_CACHE", None)
    command = [sys.executable, "-m", "huatuo_lite.cli", *(["--no-cache"] if no_cache else []), *args]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    try:
        return wall, json.loads(done.stdout)
    except ValueError:
        return wall, done.stdout


def ask(folder, image, question, cache, threads, new_tokens, no_cache=False, quant=None):
    args = ["ask", "-m", str(folder), "--threads", str(threads), "--temperature", "0", "--repetition-penalty",
            "1.0", "--max-tokens", str(new_tokens), "--json", *(["--quant", quant] if quant else []),
            str(image), question]
    wall, out = cli(args, cache, threads, no_cache)
    t = out["timings"]
    return {"wall_s": round(wall, 3), "ttft_s": round(t["time_to_first_token_s"], 4),
            "image_s": round(t["image_encode_s"], 4), "prefill_s": round(t["prefill_s"], 4),
            "hit": t.get("prefix_cache_hit"), "answer": out["answer"], "token_ids": out.get("token_ids")}


def entry_sizes(cache: Path) -> dict:
    """kind -> sizes of the entries (the kind is in each entry's header)."""
    from huatuo_lite.prefix_cache import MAGIC

    sizes: dict = {}
    for path in cache.glob("*.hlc"):
        data = path.read_bytes()
        n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
        kind = json.loads(data[len(MAGIC) + 8:len(MAGIC) + 8 + n])["kind"]
        sizes.setdefault(kind, []).append(len(data))
    return sizes


def rounds(label, folder, quant, images, threads, new_tokens, repeat) -> dict:
    per_round = []
    for r in range(repeat):
        with tempfile.TemporaryDirectory(prefix="hl-cache-") as tmp:
            cache = Path(tmp)
            first = ask(folder, images[r], Q1, cache, threads, new_tokens, quant=quant)
            sizes = entry_sizes(cache)
            order = ("second", "cold") if r % 2 == 0 else ("cold", "second")
            got = {}
            for name in order:
                got[name] = ask(folder, images[r], Q2, cache, threads, new_tokens, no_cache=name == "cold",
                                quant=quant)
            row = {"round": r + 1, "first": first, **got, "entry_bytes": sizes,
                   # token ids, not only text: a random-weight model's answer text may be empty
                   "same_answer": (got["second"]["answer"], got["second"]["token_ids"])
                                  == (got["cold"]["answer"], got["cold"]["token_ids"]),
                   "second_over_first": round(got["second"]["wall_s"] / first["wall_s"], 3),
                   "second_over_cold": round(got["second"]["wall_s"] / got["cold"]["wall_s"], 3)}
            per_round.append(row)
            print(f"  {label} round {r + 1} ({'/'.join(order)} first): first {first['wall_s']:.2f} s, "
                  f"second {got['second']['wall_s']:.2f} s (hit {got['second']['hit']}, "
                  f"{row['second_over_first']:.3f}x first), cold Q2 {got['cold']['wall_s']:.2f} s, "
                  f"same answer {row['same_answer']}; entries {sizes}", flush=True)
    med = lambda key: round(statistics.median(r[key] for r in per_round), 3)   # noqa: E731
    return {"row": label, "second_over_first": med("second_over_first"),
            "second_over_cold": med("second_over_cold"),
            "first_wall_s": round(statistics.median(r["first"]["wall_s"] for r in per_round), 3),
            "second_wall_s": round(statistics.median(r["second"]["wall_s"] for r in per_round), 3),
            "all_same_answer": all(r["same_answer"] for r in per_round), "per_round": per_round}


def batch_row(label, folder, quant, images, threads, new_tokens) -> dict:
    """One `batch` of 10 questions over 2 images (empty cache) vs 10 cold `--no-cache` asks."""
    pairs = [(images[i % 2], BATCH_QUESTIONS[i // 2]) for i in range(10)]
    with tempfile.TemporaryDirectory(prefix="hl-batch-") as tmp:
        tmp = Path(tmp)
        data = tmp / "questions.json"
        data.write_text(json.dumps([{"id": i, "image": str(img), "question": q} for i, (img, q) in enumerate(pairs)]))
        args = ["batch", str(data), "-m", str(folder), "-o", str(tmp / "out.jsonl"), "--threads", str(threads),
                "--temperature", "0", "--max-tokens", str(new_tokens), "--no-progress",
                *(["--quant", quant] if quant else [])]
        batch_wall, _ = cli(args, tmp / "cache", threads)
        rows = sorted((json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()),
                      key=lambda row: row["id"])
        cold_walls, same = [], 0
        for (image, question), row in zip(pairs, rows):
            # batch's generation defaults (repetition penalty included) for the comparison asks
            wall, out = cli(["ask", "-m", str(folder), "--threads", str(threads), "--temperature", "0",
                             "--max-tokens", str(new_tokens), "--json", *(["--quant", quant] if quant else []),
                             str(image), question], tmp / "cold-cache", threads, no_cache=True)
            cold_walls.append(wall)
            same += out["answer"] == row.get("output")
    # batch rows carry the answer text only: a random-weight model's empty texts compare equal
    # whatever the ids were, so say how many answers had any text to compare
    with_text = sum(bool(row.get("output")) for row in rows)
    result = {"row": label, "batch_wall_s": round(batch_wall, 2), "cold_asks_wall_s": round(sum(cold_walls), 2),
              "ratio": round(batch_wall / sum(cold_walls), 3), "same_answers": f"{same}/10",
              "answers_with_text": with_text}
    caveat = "" if with_text else " (all texts empty: this comparison proves nothing)"
    print(f"  {label} batch of 10 over 2 images: {batch_wall:.2f} s vs 10 cold asks {sum(cold_walls):.2f} s "
          f"({result['ratio']:.3f}x), same answers {same}/10, {with_text} with text{caveat}", flush=True)
    return result


def eviction_check(folder, quant, images, threads, new_tokens, prefix_bytes: int, feature_bytes: int) -> dict:
    """Cap = 2.5 prefix entries + 3 feature entries; 3 images asked: the oldest image's prefix goes."""
    from huatuo_lite.prefix_cache import DiskCache

    cap = int(2.5 * prefix_bytes + 3 * feature_bytes)
    with tempfile.TemporaryDirectory(prefix="hl-evict-") as tmp:
        cache = Path(tmp)
        os.environ["HUATUO_LITE_CACHE_MAX_BYTES"] = str(cap)
        try:
            for image in images[:3]:
                ask(folder, image, Q1, cache, threads, new_tokens, quant=quant)
            info = DiskCache(cache, cap=cap).info()
            again = ask(folder, images[0], Q2, cache, threads, new_tokens, quant=quant)
        finally:
            os.environ.pop("HUATUO_LITE_CACHE_MAX_BYTES")
    result = {"cap_bytes": cap, "bytes_after_3_images": info["bytes"], "entries": info["entries"],
              "oldest_image_prefix_hit_after": again["hit"]}
    print(f"  eviction: cap {cap} B, after 3 images {info['entries']} entries / {info['bytes']} B; "
          f"the first image's prefix hit afterwards: {again['hit']} (0 = evicted, as LRU should)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="small", choices=sorted(profiles.PROFILES) + ["demo"])
    parser.add_argument("--rows", nargs="*", help="e.g. 'gguf Q8_0' 'onnx int8' (default: gguf Q8_0, onnx int8)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", action="store_true", help="also the batch-of-10 row (first row only)")
    parser.add_argument("--eviction", action="store_true", help="also the eviction check (3 more asks per row)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(f"load average at start: {load_average()}", flush=True)
    if args.profile == "demo":
        targets = [(label, folder, None) for label, folder in DEMO_ROWS.items()
                   if not args.rows or label in args.rows]
    else:
        profile = profiles.PROFILES[args.profile]
        labels = args.rows or ["gguf Q8_0", "onnx int8"]
        chosen, _ = profiles.prepare(profile, args.work, labels, args.threads)
        targets = [(t.label, t.folder, t.quant) for t in chosen]
    images = write_images(Path(args.work) / "images", max(args.repeat, 3))
    results = {"profile": args.profile, "threads": args.threads, "new_tokens": args.new_tokens, "rows": []}
    for label, folder, quant in targets:
        row = rounds(label, folder, quant, images, args.threads, args.new_tokens, args.repeat)
        sizes = row["per_round"][0]["entry_bytes"]
        if args.eviction:
            row["eviction"] = eviction_check(folder, quant, images, args.threads, args.new_tokens,
                                             max(sizes["prefix"]), max(sizes["features"]))
        if args.batch and label == targets[0][0]:
            row["batch"] = batch_row(label, folder, quant, images, args.threads, args.new_tokens)
        results["rows"].append(row)
    results["load_average_end"] = load_average()
    print(f"load average at end: {results['load_average_end']}", flush=True)
    for row in results["rows"]:
        print(f"{row['row']:12} first {row['first_wall_s']:.2f} s  second {row['second_wall_s']:.2f} s  "
              f"second/first {row['second_over_first']:.3f}x  second/cold {row['second_over_cold']:.3f}x  "
              f"same answers {row['all_same_answer']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
