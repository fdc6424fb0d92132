"""What the prompt's batch split costs: text / image / text batches against one embedding batch.

Issue #19 item 3 asked for one prefill batch (llama.cpp takes a batch of token ids or of
embeddings, not both, so a prompt goes in as [text before the image] [image rows] [question];
llama-mtmd-cli splits the same way). Three plans of the same 13 + 576 + 9 positions (the
LLaVA prompt's shape), each from an empty KV cache, in rotating order per round:

  split3        ids [13] | embeddings [576] (512 + 64) | ids [9]       (what the engine does)
  prefix1+tail  embeddings [13 + 576] (512 + 77) | ids [9]             (the most the prefix cache allows)
  one           embeddings [598] (512 + 86)                            (one embedding stream)

The question must stay a batch of its own for the disk prefix cache to give a cold run's exact
numbers: a cached prefix ends after the image, and a hit feeds only the question; a cold run
that fed the question inside the image's last batch would compute those rows in another batch
shape (other matmul tiling, other last bits), and the answers with and without the cache could
differ at a near-tie. So only `prefix1+tail` is compatible with the cache; `one` is the bound.
Timing does not depend on the values, so the rows are random (the text rows would be the
token embeddings; llama.cpp's get_rows would give them exactly).

    python bench/prefill_split.py ~/.cache/huatuo-lite-bench/small/gguf-Q8_0 --rounds 6 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

BEFORE, IMAGE, AFTER = 13, 576, 9
N_BATCH = 512


def plans(width: int, rng) -> dict:
    rows = lambda n: rng.standard_normal((n, width)).astype(np.float32) * 0.02   # [n, n_embd]
    ids = lambda n, at: list(range(at, at + n))
    image = rows(IMAGE)
    return {"split3": [("ids", ids(BEFORE, 1000)), ("embd", image), ("ids", ids(AFTER, 2000))],
            "prefix1+tail": [("embd", np.concatenate([rows(BEFORE), image])), ("ids", ids(AFTER, 2000))],
            "one": [("embd", np.concatenate([rows(BEFORE), image, rows(AFTER)]))]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a converted GGUF folder (its text model is used)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import llama_cpp

    from huatuo_lite.backends.gguf import EXACT_QUANTS
    from huatuo_lite.backends.gguf_files import pick_text
    from huatuo_lite.backends.gguf_llama import Batch, load_model, new_context, quiet_llama
    from huatuo_lite.manifest import read_manifest

    manifest = read_manifest(args.folder)
    text = pick_text(args.folder, manifest, None)
    exact = str(manifest["files"][text.name].get("quant")).upper() in EXACT_QUANTS
    quiet_llama()
    model = load_model(text)
    width = llama_cpp.llama_model_n_embd(model)
    ctx = new_context(model, 2048, args.threads, N_BATCH, exact=exact)   # the engine's settings
    memory = llama_cpp.llama_get_memory(ctx)
    batches = {"ids": Batch(N_BATCH), "embd": Batch(N_BATCH, width)}
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    chosen = plans(width, np.random.default_rng(0))
    for kind, values in (p for plan in chosen.values() for p in plan):   # ids inside the vocabulary
        if kind == "ids":
            values[:] = [v % vocab for v in values]

    def run(plan) -> float:
        llama_cpp.llama_memory_clear(memory, True)
        pos, start = 0, time.perf_counter()
        for kind, values in plan:
            for at in range(0, len(values), N_BATCH):
                chunk = values[at:at + N_BATCH]
                want = np.zeros(len(chunk), bool)
                want[-1] = True
                batch = batches[kind]
                batch.fill(pos, len(chunk), want, **({"tokens": chunk} if kind == "ids" else {"embd": chunk}))
                if llama_cpp.llama_decode(ctx, batch.batch) != 0:
                    raise SystemExit("llama_decode failed")
                pos += len(chunk)
        return time.perf_counter() - start

    names = list(chosen)
    times = {name: [] for name in names}
    result = {"folder": str(args.folder), "text": text.name, "threads": args.threads,
              "load_average_start": os.getloadavg()}
    print(f"{text.name}, {args.threads} thread(s), load average {result['load_average_start']}")
    run(chosen["split3"])   # warm-up: first-touch of the weights is not the split's cost
    for index in range(args.rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            times[name].append(run(chosen[name]))
        print(f"round {index + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names), flush=True)
    result["load_average_end"] = os.getloadavg()
    result["seconds"] = times
    result["median_s"] = {name: statistics.median(values) for name, values in times.items()}
    base = result["median_s"]["split3"]
    for name in names:
        print(f"{name}: median {result['median_s'][name]:.3f} s ({result['median_s'][name] / base:.3f}x split3)")
    print(f"load average at end {result['load_average_end']}")
    for batch in batches.values():
        batch.close()
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
