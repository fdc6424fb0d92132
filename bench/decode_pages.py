"""Decode speed with and without huge pages under llama.cpp's weights, beside stock llama-bench.

Issue #19 item 5: our 7B decode read 0.91-0.95x of stock in alternating rounds, with the same
kernels in the same shares (perf), so what was left is how fast the same kernels read memory.
On this VM a read of 4 KiB pages runs at ~4 GB/s against ~10 with 2 MiB pages (nested
paging: bench/roofline.py), and llama.cpp puts its repacked weights (3 GB of the 7B Q4_K_M)
on 4 KiB pages. The GGUF engine can advise huge pages for them as they are allocated
(huatuo_lite.backends.gguf_llama.MappedPageDropper) when HUATUO_LITE_HUGEPAGES=1.

Each round runs three fresh processes in a rotating order: ours with huge pages, ours
without, and stock `llama-bench -p 0 -n N -d P` (decode after P cached tokens, P = our prompt).
Ours: GgufEngine on the folder (the vision side opened as in `ask`), a P-token text prefill,
then N greedy steps, timed step by step; we report tokens/s of the steps, the load seconds,
and the process's AnonHugePages. Medians over rounds; every round printed; load average at
start and end.

    python bench/decode_pages.py ~/.cache/huatuo-lite-bench/qwen25vl-7b/gguf-Q4_K_M --rounds 4 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PEERS = ("ours huge", "ours 4k", "stock")


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def child(folder: str, threads: int, prompt: int, new_tokens: int) -> dict:
    """In a fresh process: open the engine, prefill `prompt` text tokens, time `new_tokens` steps."""
    import numpy as np

    from huatuo_lite.backends.gguf import GgufEngine

    start = time.perf_counter()
    engine = GgufEngine(Path(folder), threads=threads)
    load_s = time.perf_counter() - start
    ids = [int(i) for i in np.random.default_rng(0).integers(10, min(20000, engine.n_vocab), prompt)]
    logits = engine.prefill([ids])
    token, steps = int(np.argmax(logits)), []
    for _ in range(new_tokens):
        t = time.perf_counter()
        token = int(np.argmax(engine.step(token)))
        steps.append(time.perf_counter() - t)
    huge = sum(int(line.split()[1]) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()
               if line.startswith("AnonHugePages:")) // 1024
    return {"load_s": load_s, "decode_tokens_per_s": len(steps) / sum(steps), "anon_huge_mb": huge}


def ours(folder: Path, threads: int, prompt: int, new_tokens: int, huge: bool) -> dict:
    env = {**os.environ, "HUATUO_LITE_HUGEPAGES": "1" if huge else "0"}
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--threads", str(threads),
                          "--prompt", str(prompt), "--new-tokens", str(new_tokens)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the measuring child failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def stock(folder: Path, threads: int, prompt: int, new_tokens: int) -> dict:
    import stock as stock_tools
    from profiles import text_gguf

    manifest = json.loads((folder / "manifest.json").read_text())
    text = text_gguf(folder)
    quant = manifest["files"][text.name].get("quant")
    found = stock_tools.llama_bench(text, threads, new_tokens, 1, prompt_tokens=prompt, quant=quant, depth=prompt)
    return {"decode_tokens_per_s": found["decode_tokens_per_s"], "args": found["llama_bench_args"]["decode"]}


def run(folder: Path, rounds: int, threads: int, prompt: int, new_tokens: int, with_stock: bool) -> dict:
    peers = [p for p in PEERS if with_stock or p != "stock"]
    runs = {p: [] for p in peers}
    result = {"folder": str(folder), "threads": threads, "prompt": prompt, "new_tokens": new_tokens,
              "load_average_start": load_average()}
    print(f"load average at start: {result['load_average_start']}", flush=True)
    for index in range(rounds):
        order = peers[index % len(peers):] + peers[:index % len(peers)]
        for peer in order:
            figures = (stock(folder, threads, prompt, new_tokens) if peer == "stock" else
                       ours(folder, threads, prompt, new_tokens, huge=peer == "ours huge"))
            runs[peer].append(figures)
            print(f"round {index + 1} {peer}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in figures.items() if k != "args"), flush=True)
    result["load_average_end"] = load_average()
    print(f"load average at end: {result['load_average_end']}")
    result["runs"] = runs
    result["median_decode_tokens_per_s"] = {p: statistics.median(r["decode_tokens_per_s"] for r in runs[p])
                                            for p in peers}
    for p in peers:
        print(f"{p}: median decode {result['median_decode_tokens_per_s'][p]:.2f} tok/s over {rounds} rounds")
    if with_stock:
        for p in ("ours huge", "ours 4k"):
            ratios = [a["decode_tokens_per_s"] / b["decode_tokens_per_s"] for a, b in zip(runs[p], runs["stock"])]
            result[f"{p} / stock per round"] = ratios
            print(f"{p} / stock per round: " + ", ".join(f"{r:.2f}" for r in ratios))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a converted GGUF folder")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=598, help="cached tokens before the timed steps")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-stock", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(str(args.folder), args.threads, args.prompt, args.new_tokens)))
        return
    result = run(args.folder, args.rounds, args.threads, args.prompt, args.new_tokens, not args.no_stock)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
