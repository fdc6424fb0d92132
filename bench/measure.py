"""One benchmark row, run in its own process so that its peak RSS (VmHWM) is its own.

    python bench/measure.py '{"backend": "gguf", "folder": "...", "quant": "Q4_K_M",
                              "threads": 2, "new_tokens": 64, "images": ["r0.png", ...]}'

Loads the model through the public API (`huatuo_lite.load`), then for each image
(one per repeat, so no repeat finds the previous one's features or KV prefix):
asks a first question (image encode + full prefill + greedy decode) and a
follow-up on the same image (feature cache + KV prefix reuse). The last stdout
line is one JSON object: load_s, peak_rss_mb (VmHWM), peak_anon_mb / peak_file_mb
(sampled: memory owned vs mmapped file pages) and per-question lists of timings.
"""
from __future__ import annotations

import json
import os
import sys
import time

FIRST_QUESTION = "Describe the findings in this image."
FOLLOW_UP = "Is there any sign of an abnormality?"
TIMING_KEYS = ("image_encode_s", "prefill_s", "prefill_tokens_per_s", "time_to_first_token_s",
               "decode_s", "decode_tokens_per_s")


def limit_threads(threads: int) -> None:
    """BLAS/OpenMP pools read these once at import: set them before numpy/torch load."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def peak_rss_mb() -> float:
    """VmHWM (peak resident set) of this process from /proc; ru_maxrss where there is no /proc."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024          # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakSampler:
    """Peak anonymous and file-backed resident memory, sampled from /proc every `every` s
    in a daemon thread. VmHWM counts the pages of mmapped files (llama.cpp's weights, its
    quantizer's input) that the kernel may drop at any time; RssAnon is memory the process
    really owns. Use as a context manager; .peaks() -> {'peak_anon_mb', 'peak_file_mb'}."""

    def __init__(self, every: float = 0.2):
        import threading

        self.every, self.anon, self.file = every, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            fields = dict(line.split(":", 1) for line in open("/proc/self/status", encoding="ascii"))
        except OSError:
            return
        if "RssAnon" in fields:
            self.anon = max(self.anon, int(fields["RssAnon"].split()[0]) / 1024)
            self.file = max(self.file, int(fields["RssFile"].split()[0]) / 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def peaks(self) -> dict:
        return {"peak_anon_mb": round(self.anon), "peak_file_mb": round(self.file)}


class NoEos:
    """Forwards to an engine but never stops at EOS: random weights may emit it at any
    step, and every row must decode the same number of tokens."""

    eos_token_ids = frozenset()

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)


def ask(model, image, question: str, new_tokens: int) -> dict:
    answer = model.ask(image, question, temperature=0, max_new_tokens=new_tokens)
    row = {key: answer.timings[key] for key in TIMING_KEYS}
    row.update(prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
               token_ids=answer.token_ids)
    return row


def measure(spec: dict) -> dict:
    from huatuo_lite.api import load

    options = {"threads": spec["threads"]}
    if spec.get("quant"):
        options["quant"] = spec["quant"]
    t0 = time.perf_counter()
    model = load(spec["folder"], backend=spec["backend"], **options)
    load_s = time.perf_counter() - t0
    engine = model.engine
    model.engine = NoEos(engine)
    first, follow = [], []
    for image in spec["images"]:
        first.append(ask(model, image, FIRST_QUESTION, spec["new_tokens"]))
        follow.append(ask(model, image, FOLLOW_UP, spec["new_tokens"]))
        follow[-1]["reused_positions"] = getattr(engine, "reused_positions", None)
    model.engine = engine
    model.close()
    return {"load_s": load_s, "peak_rss_mb": peak_rss_mb(), "first": first, "follow_up": follow}


def main() -> None:
    spec = json.loads(sys.argv[1])
    limit_threads(spec["threads"])
    # these rows are the in-process figures (cold first question, follow-up); the disk
    # cache has its own rows (bench/prefix_cache.py) and would make a rerun's first question warm
    os.environ.setdefault("HUATUO_LITE_NO_CACHE", "1")
    with PeakSampler() as sampler:
        result = measure(spec)
    result.update(sampler.peaks())
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
