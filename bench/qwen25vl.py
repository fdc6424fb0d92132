"""Qwen2.5-VL family (issue #20): `huatuo-lite ask` in a new process beside stock
`llama-mtmd-cli` on the same GGUF files, for three input sizes, in alternating rounds.

    python bench/qwen25vl.py --profile qwen25vl-small --rows "gguf F16" "gguf Q4_K_M" \
        --rounds 3 --threads 2 --new-tokens 32 --out qwen25vl.json

Time to first token depends on the image now (smart_resize: (h/28)*(w/28) image tokens), so
every row is timed for 336x336 (144 tokens), 448x448 (256) and 1024x768 (resized to 1036x756,
999 tokens) inputs. Per row, size and round, with a new random image each round:
  ours   `huatuo-lite --no-cache ask --json --temperature 0 --repetition-penalty 1.0 IMAGE Q`
         in a new process: wall time spawn to exit, its TTFT (image encode + prefill) and
         decode rate from its --json timings
  stock  `llama-mtmd-cli --jinja` on the same text GGUF + mmproj, greedy, same token budget,
         our attention settings (stock.attention_args), given the image ALREADY resized the
         way we resize it (fit_qwen25vl: smart_resize + PIL bicubic; libmtmd's own resize
         differs) and our token bounds (--image-min/max-tokens), so both encode the same
         pixels; its TTFT = its own llama_perf prompt-eval time, which spans the image encode
         (measured, never estimated; `-v`, because without it this build's async logger
         dropped the timing lines in every try here)
Both processes are watched the same way: peak RSS = the child's ru_maxrss (wait4), and the
sampled peaks of RssAnon (owned) and RssFile (mapped files) from /proc/PID/status.
Which peer goes first alternates every round (bench/rounds.py). Load average at start and end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profiles  # noqa: E402  (bench/ is not a package)
import rounds  # noqa: E402
import stock  # noqa: E402
from measure import FIRST_QUESTION  # noqa: E402
from run import DEFAULT_WORK  # noqa: E402

SIZES = ((336, 336), (448, 448), (1024, 768))      # (width, height) of the input images
MTMD_TRIES = 3                                     # its async logger may drop the timing lines
SAMPLE_EVERY_S = 0.05


# both peers' context: our engine would open the manifest's 8192 positions and llama-mtmd-cli
# 4096, a 224 MiB difference of KV cache on the 7B shape that read as ours using more memory
N_CTX = 4096

def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_images(folder: Path, size: tuple, rounds_: int, image_pixels: tuple) -> list[tuple[Path, Path]]:
    """Per round (original, resized): a random RGB PNG of `size` (seeded by size and round, so no
    round finds another's cache) and the same image as we resize it (the file stock gets)."""
    import numpy as np
    from PIL import Image

    from huatuo_lite.image.load import fit_qwen25vl

    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in range(rounds_):
        width, height = size
        original, resized = folder / f"q-{width}x{height}-{index}.png", folder / f"q-{width}x{height}-{index}-fit.png"
        if not resized.is_file():
            rng = np.random.default_rng([width, height, index])
            img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            img.save(original)
            fit_qwen25vl(img, *image_pixels).save(resized)
        pairs.append((original, resized))
    return pairs


def watch(command: list, env: dict, out: Path) -> dict:
    """Run `command` to its end; {wall_s, rc, peak_rss_mb (ru_maxrss), peak_anon_mb, peak_file_mb
    (sampled)}; stdout to out.stdout, stderr to out.stderr (files: no pipe can fill)."""
    import subprocess

    anon = file = 0.0
    with open(out.with_suffix(".stdout"), "wb") as so, open(out.with_suffix(".stderr"), "wb") as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, stdout=so, stderr=se, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                fields = dict(line.split(":", 1) for line in open(f"/proc/{proc.pid}/status", encoding="ascii"))
                anon = max(anon, int(fields["RssAnon"].split()[0]) / 1024)
                file = max(file, int(fields["RssFile"].split()[0]) / 1024)
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(SAMPLE_EVERY_S)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(wall, 3), "rc": proc.returncode, "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "peak_anon_mb": round(anon), "peak_file_mb": round(file)}


def ours(target, image: Path, args, tmp: Path) -> dict:
    env = {**os.environ, "HUATUO_LITE_CACHE": str(tmp / "cache"), "HUATUO_LITE_NO_NOTICE": "1",
           **{v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    command = [sys.executable, "-m", "huatuo_lite.cli", "--no-cache", "ask", "-m", str(target.folder),
               "--quant", target.quant, "--threads", str(args.threads), "--temperature", "0",
               "--repetition-penalty", "1.0", "--max-tokens", str(args.new_tokens), "--json", "-q",
               "--n-ctx", str(getattr(args, "n_ctx", N_CTX)),
               str(image), FIRST_QUESTION]
    result = watch(command, env, tmp / "ours")
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{(tmp / 'ours.stderr').read_text()[-2000:]}")
    out = json.loads((tmp / "ours.stdout").read_text())
    t = out["timings"]
    result.update(ttft_s=t["time_to_first_token_s"], image_encode_s=t["image_encode_s"], prefill_s=t["prefill_s"],
                  decode_tokens_per_s=t["decode_tokens_per_s"], prompt_tokens=out["prompt_tokens"],
                  completion_tokens=out["completion_tokens"])
    return result


def stock_args(target, image: Path, args, image_tokens: tuple) -> list:
    from huatuo_lite.llama_tools import MTMD_MARKER

    files = target_files(target)
    # the Qwen chat template (--jinja, with its default system prompt) around marker + question,
    # as our render puts the image before the question
    return ["-m", files["text"], "--mmproj", files["mmproj"], "--image", image, "-p", MTMD_MARKER + FIRST_QUESTION,
            "--jinja", "--temp", "0", "--repeat-penalty", "1.0", "-n", args.new_tokens, "-t", args.threads,
            "--no-warmup", "-c", getattr(args, "n_ctx", N_CTX), "--seed", 0, "-v", "--image-min-tokens", image_tokens[0],
            "--image-max-tokens", image_tokens[1], *stock.attention_args(target.quant, "llama-mtmd-cli")]


def target_files(target) -> dict:
    from huatuo_lite.manifest import read_manifest

    files = read_manifest(target.folder)["files"]
    return {entry["role"]: target.folder / name for name, entry in files.items() if entry["role"] in ("text", "mmproj")}


def run_stock(target, image: Path, args, tmp: Path, image_tokens: tuple) -> dict:
    from huatuo_lite.llama_tools import find_tool, tool_env

    exe = find_tool("llama-mtmd-cli")
    command = [str(exe), *map(str, stock_args(target, image, args, image_tokens))]
    for attempt in range(1, MTMD_TRIES + 1):
        result = watch(command, tool_env(exe, None, ()), tmp / "stock")
        log = (tmp / "stock.stderr").read_text(errors="replace") + (tmp / "stock.stdout").read_text(errors="replace")
        if result["rc"] != 0:
            raise SystemExit(f"llama-mtmd-cli failed ({result['rc']}):\n{log[-2000:]}")
        if stock.MTMD_PATTERNS["prompt_eval_ms"].search(log):
            break
    else:
        return {**result, "timings_lost": True, "tries": attempt}
    timings = stock.parse_mtmd_log(log)
    # llama_perf's prompt-eval clock starts at the first prompt batch (the system text before the
    # image) and stops at the next synchronisation, after the image batch: it already spans the
    # image encode (here 25.1 s = encode 20.7 + image batch 2.9 + text 1.5), so it IS stock's
    # time to first token; stock.parse_mtmd_log's encode + prompt eval would count the encode twice
    result.update(ttft_s=timings["prefill_s"], image_encode_s=timings["image_encode_s"],
                  prefill_s=timings["prefill_s"], prompt_tokens=timings["prompt_tokens"],
                  decode_tokens_per_s=timings.get("decode_tokens_per_s"), tries=attempt,
                  args=" ".join(map(str, command[1:])))
    return result


KEYS = ("wall_s", "ttft_s", "image_encode_s", "prefill_s", "decode_tokens_per_s", "peak_rss_mb", "peak_anon_mb",
        "peak_file_mb", "prompt_tokens", "completion_tokens")


def medians(runs: list[dict]) -> dict:
    out = {}
    for key in KEYS:
        values = [run[key] for run in runs if run.get(key) is not None]
        if values:
            out[key] = round(statistics.median(values), 3)
    return out


def measure(target, size: tuple, images: list, args, bounds: tuple) -> dict:
    """Alternating rounds of ours (original image) and stock (the image as we resize it)."""
    runs = {rounds.OURS: [], rounds.STOCK: []}
    for index, order in enumerate(rounds.round_orders(args.rounds)):
        original, resized = images[index]
        for peer in order:
            with tempfile.TemporaryDirectory(prefix="qwen25vl-bench-") as tmp:
                got = (ours(target, original, args, Path(tmp)) if peer == rounds.OURS
                       else run_stock(target, resized, args, Path(tmp), bounds))
            runs[peer].append(got)
            print(f"  {target.label} {size[0]}x{size[1]} round {index + 1} {peer}: wall {got['wall_s']:.2f} s, "
                  f"TTFT {got.get('ttft_s', float('nan')):.2f} s, decode {got.get('decode_tokens_per_s') or 0:.2f} "
                  f"tok/s, prompt {got.get('prompt_tokens')}, peak RSS {got['peak_rss_mb']} MB "
                  f"(anon {got['peak_anon_mb']}, file {got['peak_file_mb']})", flush=True)
    row = {"label": target.label, "size": f"{size[0]}x{size[1]}", "ours": medians(runs[rounds.OURS]),
           "stock": medians(runs[rounds.STOCK]), "per_round": runs}
    if row["stock"].get("ttft_s"):
        row["ttft_ratio"] = round(row["ours"]["ttft_s"] / row["stock"]["ttft_s"], 3)
    if row["stock"].get("decode_tokens_per_s"):
        row["decode_ratio"] = round(row["ours"]["decode_tokens_per_s"] / row["stock"]["decode_tokens_per_s"], 3)
    row["rss_ratio"] = round(row["ours"]["peak_rss_mb"] / row["stock"]["peak_rss_mb"], 3)
    return row


def table(result: dict) -> str:
    lines = ["| row | input | image tokens | ours TTFT s | stock TTFT s | TTFT ours/stock | ours wall s | stock wall s "
             "| ours decode tok/s | stock decode tok/s | decode ours/stock | ours peak RSS MB (anon / file) "
             "| stock peak RSS MB (anon / file) |", "|---|---|" + "---:|" * 11]
    for r in result["rows"]:
        o, s = r["ours"], r["stock"]
        tokens = o.get("prompt_tokens", 0) - result["text_tokens"]
        lines.append(f"| {r['label']} | {r['size']} | {tokens:.0f} | {o['ttft_s']:.2f} | {s.get('ttft_s', float('nan')):.2f} "
                     f"| {r.get('ttft_ratio', float('nan')):.2f}x | {o['wall_s']:.2f} | {s['wall_s']:.2f} "
                     f"| {o['decode_tokens_per_s']:.2f} | {s.get('decode_tokens_per_s', float('nan')):.2f} "
                     f"| {r.get('decode_ratio', float('nan')):.2f}x | {o['peak_rss_mb']:.0f} ({o['peak_anon_mb']:.0f} / "
                     f"{o['peak_file_mb']:.0f}) | {s['peak_rss_mb']:.0f} ({s['peak_anon_mb']:.0f} / {s['peak_file_mb']:.0f}) |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="qwen25vl-small",
                        choices=sorted(name for name, p in profiles.PROFILES.items() if p.maker == "make_tiny_qwen25vl"))
    parser.add_argument("--rows", nargs="*", help="GGUF rows (default: the profile's default GGUF rows)")
    parser.add_argument("--sizes", nargs="*", default=[f"{w}x{h}" for w, h in SIZES], help="WxH of the inputs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=N_CTX, help="context of both peers (KV cache size: memory)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    profile = profiles.get_profile(args.profile)
    args.rows = args.rows or [label for label in profiles.default_labels(profile) if label.startswith("gguf ")]
    if not args.rows:
        parser.error(f"the {profile.name} profile's rows run only when named ({profile.about}): "
                     "pass e.g. --rows 'gguf Q4_K_M'")
    if args.rounds < 1 or args.threads < 1 or not all(row in profiles.all_labels(profile) and row.startswith("gguf ")
                                                      for row in args.rows):
        parser.error("--rounds and --threads must be at least 1, and --rows the profile's GGUF rows "
                     "(stock runs GGUF files)")
    start = load_average()
    print(f"profile {profile.name}: {profile.about}; threads {args.threads}; load average at start {start}", flush=True)
    targets, built = profiles.prepare(profile, args.work, args.rows, args.threads)
    from huatuo_lite.families import qwen25vl
    from huatuo_lite.manifest import read_manifest

    image = read_manifest(targets[0].folder).get("image") or {}
    pixels = (image.get("min_pixels", qwen25vl.MIN_PIXELS), image.get("max_pixels", qwen25vl.MAX_PIXELS))
    area = qwen25vl.FACTOR ** 2
    bounds = (max(1, -(-pixels[0] // area)), pixels[1] // area)     # the token bounds our engine gives libmtmd
    result = {"profile": profile.name, "threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
              "load_average_start": start, "built": built, "token_bounds": bounds, "rows": []}
    for target in targets:
        for size in ([int(x) for x in s.lower().split("x")] for s in args.sizes):
            images = write_images(Path(args.work) / "images-qwen25vl", tuple(size), args.rounds, pixels)
            result["rows"].append(measure(target, tuple(size), images, args, bounds))
            if args.out:
                args.out.write_text(json.dumps(result, indent=1))
    result["load_average_end"] = load_average()
    first_w, first_h = (int(x) for x in result["rows"][0]["size"].split("x"))
    h, w = qwen25vl.smart_resize(first_h, first_w, *pixels)
    # the prompt's text tokens: the first row's prompt less its image tokens ((h/28) x (w/28))
    result["text_tokens"] = result["rows"][0]["ours"]["prompt_tokens"] - (h // qwen25vl.FACTOR) * (w // qwen25vl.FACTOR)
    print(f"load average at end {result['load_average_end']}\n\n{table(result)}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
