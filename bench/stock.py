"""Stock llama.cpp on the same GGUF files: the peer our GGUF backend is held to.

llama-bench gives prefill (pp, `-p`) and decode (tg, `-n`) tokens/s on the text GGUF;
llama-mtmd-cli, given the mmproj and an image, gives the whole first answer's timings
(image encode, prompt eval of image + text, decode), i.e. its time to first token.
Both come from huatuo_lite.llama_tools (build/bin); when absent the rows are skipped.

Like for like: decode runs at the depth our rows decoded at (`-d` = their prompt tokens:
attention over ~600 cached positions costs ~20% of a small model's step; tg at depth 0
flattered stock by that much), and with the attention settings our context uses
(huatuo_lite.backends.gguf_llama.new_context: unquantized GGUFs run exact, F32 KV cache
and no flash attention; quantized ones llama.cpp's defaults). The arguments go in the row.
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from huatuo_lite import llama_tools as native
from huatuo_lite.errors import HuatuoError

MTMD_TRIES = 2                 # this build's mtmd-cli usually loses its perf lines: retry once
PROMPT_TOKENS = 576           # one image's tokens: the prefill a first question pays
# our exact mode (gguf_native.new_context(exact=True): F32 KV cache, flash attention off) in
# each tool's flags. llama-bench parses no f32 cache type (its ggml_type_from_name knows f16,
# bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl), so its K/V stay F16: at depth 598 on the small
# shape that is 7 MB less to read per token than ours (24 layers x K,V x 598 x 128 x 2 bytes).
EXACT_ARGS = {"llama-mtmd-cli": ("-fa", "off", "-ctk", "f32", "-ctv", "f32"),
              "llama-bench": ("-fa", "off")}
# llama-mtmd-cli / llama_perf lines (milliseconds)
MTMD_PATTERNS = {
    "image_encode_ms": re.compile(r"(?:image slice encoded in|mtmd batch encoding done in)\s+([\d.]+)\s*ms"),
    "image_decode_ms": re.compile(r"image decoded \(batch \d+/\d+\) in\s+([\d.]+)\s*ms"),
    "prompt_eval_ms": re.compile(r"prompt eval time =\s+([\d.]+)\s*ms\s*/\s*(\d+)\s*tokens"),
    "eval_ms": re.compile(r"\beval time =\s+([\d.]+)\s*ms\s*/\s*(\d+)\s*runs"),
}


def tools() -> dict:
    """{'llama-bench': path or None, 'llama-mtmd-cli': path or None}."""
    return {name: native.find_tool(name, required=False) for name in ("llama-bench", "llama-mtmd-cli")}


def attention_args(quant: str | None, tool: str) -> list:
    """`tool`'s flags matching the attention settings of our context for this quant: exact
    mode (EXACT_ARGS) for unquantized GGUFs, llama.cpp's defaults (none) for quantized ones."""
    from huatuo_lite.backends.gguf import EXACT_QUANTS

    return list(EXACT_ARGS[tool]) if str(quant).upper() in EXACT_QUANTS else []


def bench_args(text_gguf: Path, quant: str | None, threads: int, repeat: int, prompt_tokens: int,
               new_tokens: int, depth: int) -> dict:
    """{'prefill': args, 'decode': args} of the two llama-bench invocations: pp of
    prompt_tokens from an empty cache; tg of new_tokens after `depth` cached tokens."""
    prompt_tokens, depth = int(prompt_tokens), int(depth)      # medians over repeats arrive as floats
    common = ["-t", threads, "-r", max(1, repeat), *attention_args(quant, "llama-bench"), "-o", "json"]
    return {"prefill": ["-m", text_gguf, "-p", prompt_tokens, "-n", 0, *common],
            "decode": ["-m", text_gguf, "-p", 0, "-n", new_tokens, "-d", depth, *common]}


def llama_bench(text_gguf: Path, threads: int, new_tokens: int, repeat: int,
                prompt_tokens: int = PROMPT_TOKENS, quant: str | None = None, depth: int = 0) -> dict:
    """{'prefill_tokens_per_s', 'decode_tokens_per_s', 'llama_bench_args'} of llama-bench (its
    mean of `repeat` runs). pp and tg run as two invocations: in one `-p 576 -n 64` run here
    tg64 came out at 0.9 tok/s where a tg-only run gave 47 on the same file minutes apart."""
    invocations = bench_args(text_gguf, quant, threads, repeat, prompt_tokens, new_tokens, depth)
    result = {"llama_bench_args": {phase: " ".join(map(str, args)) for phase, args in invocations.items()}}
    for phase, args in invocations.items():
        records = json.loads(_text(native.run_tool("llama-bench", args, timeout=3600).stdout))
        if len(records) != 1:
            raise HuatuoError(f"llama-bench printed {len(records)} results for one test on {text_gguf.name}; "
                              "run it by hand to see why.")
        result[f"{phase}_tokens_per_s"] = float(records[0]["avg_ts"])
    return result


def parse_mtmd_log(text: str) -> dict:
    """Milliseconds of each phase found in llama-mtmd-cli's log -> seconds and tokens/s.
    Its async logger may drop the llama_perf lines at exit; then only the image encode is known."""
    found = {key: pattern.search(text) for key, pattern in MTMD_PATTERNS.items()}
    if found["image_encode_ms"] is None:
        raise HuatuoError("llama-mtmd-cli printed no image encode time; run it by hand to see why.")
    result = {"image_encode_s": float(found["image_encode_ms"].group(1)) / 1000}
    if found["prompt_eval_ms"]:
        prompt_s = float(found["prompt_eval_ms"].group(1)) / 1000
        prompt_n = int(found["prompt_eval_ms"].group(2))
        # llama.cpp's prompt clock starts at the first decode of the prompt (the text before the
        # image) and stops at the next synchronize (reading the last logits): the image encode in
        # between is inside it, so the prompt eval time IS the time to first token (adding the
        # encode again counted it twice, as bench/README.md's correction says)
        result.update(prefill_s=prompt_s, prefill_tokens_per_s=prompt_n / prompt_s if prompt_s else 0.0,
                      time_to_first_token_s=prompt_s, prompt_tokens=prompt_n)
    if found["eval_ms"] and int(found["eval_ms"].group(2)) > 1:
        eval_s, runs = float(found["eval_ms"].group(1)) / 1000, int(found["eval_ms"].group(2))
        result.update(decode_s=eval_s, decode_tokens_per_s=runs / eval_s)
    return result


def mtmd_first_answer(text_gguf: Path, mmproj: Path, image: Path, question: str, threads: int,
                      new_tokens: int, quant: str | None = None) -> dict:
    """One greedy first answer by llama-mtmd-cli; its timings (see parse_mtmd_log)."""
    from huatuo_lite.convert.gguf.text import MTMD_MARKER
    from huatuo_lite.families.llava import IMAGE_LINE, IMAGE_PLACEHOLDER

    prompt = IMAGE_LINE.replace(IMAGE_PLACEHOLDER, MTMD_MARKER) + question
    args = ["-m", text_gguf, "--mmproj", mmproj, "--image", image, "-p", prompt, "--temp", "0",
            "-n", new_tokens, "-t", threads, "--jinja", "--no-warmup", "-c", 4096, "--seed", 0,
            "--ignore-eos", "-v", *attention_args(quant, "llama-mtmd-cli")]   # -v: without it this build's
    # logger dropped the llama_perf lines in most runs (stock's TTFT was then estimated, not measured)
    for _ in range(MTMD_TRIES):     # its async logger can drop the last lines (the timings) at exit
        done = native.run_tool("llama-mtmd-cli", args, timeout=3600)
        log = _text(done.stderr) + "\n" + _text(done.stdout)
        if MTMD_PATTERNS["prompt_eval_ms"].search(log):
            break
    return parse_mtmd_log(log)


def _text(data) -> str:
    """run_tool gives stdout as bytes (generated text may end mid-character)."""
    return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data


def stock_rows(gguf_targets: list, images: list, question: str, threads: int, new_tokens: int,
               repeat: int, prompt_tokens: int = PROMPT_TOKENS, mtmd: bool = True) -> tuple[list[dict], list[str]]:
    """One 'llama.cpp <quant>' row per GGUF target; notes for what could not run. Prefill (of
    prompt_tokens) and decode (after prompt_tokens cached, like ours) are llama-bench's; TTFT is
    llama-mtmd-cli's (image encode + prompt eval), or, when its log lost the perf lines, its
    image encode + prompt_tokens at llama-bench's prefill rate. mtmd-cli gets the same
    attention settings (attention_args)."""
    from profiles import text_gguf

    found, rows, notes = tools(), [], []
    if found["llama-bench"] is None:
        return [], [f"stock llama.cpp rows skipped: llama-bench was not found ({native.BUILD_HINT})."]
    for target in gguf_targets:
        row = {"label": f"llama.cpp {target.quant}", "backend": "llama.cpp", "quant": target.quant,
               "folder": str(target.folder), "decode_depth": prompt_tokens}
        try:
            row.update(llama_bench(text_gguf(target.folder), threads, new_tokens, repeat, prompt_tokens,
                                   quant=target.quant, depth=prompt_tokens))
        except (HuatuoError, ValueError, KeyError) as exc:   # one broken peer row must not end the run
            notes.append(f"{row['label']}: {type(exc).__name__}: {exc}")
            continue
        try:                                                  # its TTFT only: keep llama-bench's figures
            if found["llama-mtmd-cli"] is not None and mtmd:
                row.update(_mtmd_median(target, images, question, threads, new_tokens))
        except (HuatuoError, ValueError, KeyError) as exc:
            notes.append(f"{row['label']} llama-mtmd-cli: {type(exc).__name__}: {exc}")
        if "image_encode_s" in row and "time_to_first_token_s" not in row:
            row["time_to_first_token_s"] = row["image_encode_s"] + prompt_tokens / row["prefill_tokens_per_s"]
            row["ttft_estimated"] = True
        rows.append(row)
    return rows, notes


def _mtmd_median(target, images, question, threads, new_tokens) -> dict:
    """Median over the images of mtmd-cli's figures; the row's prefill and decode rates stay
    llama-bench's. mtmd-cli's own decode rate (EOS ignored, right after its prompt, with all of
    our exact-mode flags) is kept beside them as mtmd_decode_tokens_per_s."""
    from huatuo_lite.manifest import read_manifest
    from profiles import text_gguf

    files = read_manifest(target.folder)["files"]
    mmproj = target.folder / next(name for name, entry in files.items() if entry["role"] == "mmproj")
    runs = [mtmd_first_answer(text_gguf(target.folder), mmproj, image, question, threads, new_tokens,
                              target.quant) for image in images]
    result = {"mtmd_attention_args": " ".join(attention_args(target.quant, "llama-mtmd-cli"))}
    for key, name in (("image_encode_s", "image_encode_s"), ("prefill_s", "prefill_s"),
                      ("time_to_first_token_s", "time_to_first_token_s"),
                      ("decode_tokens_per_s", "mtmd_decode_tokens_per_s")):
        values = [run[key] for run in runs if key in run]
        if values:
            result[name] = statistics.median(values)
    return result
