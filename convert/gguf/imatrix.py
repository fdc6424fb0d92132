"""Importance-matrix quantization with llama.cpp's native tools.

    export_gguf(src, out, quant="Q4_K_M", imatrix="calib.json")

1. Calibration text: medical question/answer records (PubMedVision format, with
   "conversations", or the eval format, with "question"/"options"/"answer") rendered
   with the upstream prompt (prompt.render), each answer closed as upstream does.
   The text model is calibrated on text alone: llama-imatrix cannot feed image
   features, so images are left out of the prompt.
2. `llama-imatrix` on the lossless intermediate GGUF -> an imatrix GGUF (per weight
   matrix: the mean squared activation of each input column).
3. `llama-quantize --imatrix` to the requested quant.
The returned record (calibration file, its sha256, records, chunks, context, tool
versions) goes into the manifest entry of the text GGUF.
"""
from __future__ import annotations

import os
from pathlib import Path

from huatuo_lite.families import llava as family
from huatuo_lite.errors import HuatuoError
from huatuo_lite.fsutil import sha256_file
from huatuo_lite.jsonrecords import read_record_list
from huatuo_lite.llama_tools import find_tool, run_tool, tool_version
from huatuo_lite.prompt import Turn, render

IMATRIX_CTX = 512           # tokens per llama-imatrix chunk (its default); it needs >= 2 chunks
TOOL_TIMEOUT_S = 24 * 3600  # a 34B imatrix on CPU takes hours, never days


# ---------------------------------------------------------- calibration ----
def _eval_pairs(record: dict) -> list[tuple[str, str]]:
    """Eval format: the lettered prompt answered with the right option's letter."""
    from huatuo_lite.eval.run import build_prompt

    options = [str(o) for o in record.get("options") or []]
    answer = str(record.get("answer", ""))
    letter = family.EVAL_OPTION_LETTERS[options.index(answer)] if answer in options else answer
    return [(build_prompt(str(record["question"]), options), letter)]


def _conversation_pairs(record: dict) -> list[tuple[str, str]]:
    """PubMedVision format: consecutive human/gpt messages."""
    messages = [(m.get("from"), str(m.get("value", ""))) for m in record["conversations"]]
    return [(q, a) for (who_q, q), (who_a, a) in zip(messages[::2], messages[1::2])
            if who_q == "human" and who_a == "gpt"]


# record kind -> (the key that marks it, its question/answer pairs)
RECORD_KINDS = {"pubmedvision": ("conversations", _conversation_pairs), "eval": ("question", _eval_pairs)}


def _pairs(record) -> list[tuple[str, str]]:
    for key, pairs in RECORD_KINDS.values():
        if isinstance(record, dict) and key in record:
            return pairs(record)
    return []


def record_text(pairs: list[tuple[str, str]]) -> str:
    """One conversation in the upstream template, every turn answered:
    "<|user|>\\n{q}\\n<|assistant|>\\n{a} \\n" per turn. "<image>" marks are dropped
    (the tool gets text only)."""
    clean = [(q.replace(family.IMAGE_PLACEHOLDER, "").strip(), a) for q, a in pairs]
    clean = [(q, a) for q, a in clean if q]
    if not clean:
        return ""
    turns = [Turn(question=q, answer=a) for q, a in clean[:-1]] + [Turn(question=clean[-1][0])]
    return render(turns) + clean[-1][1] + family.ANSWER_SUFFIX


def calibration_text(path) -> tuple[str, int]:
    """(text, number of records used) from a calibration JSON (a list of records)."""
    path = Path(path)
    records = read_record_list(path, "calibration file", "a JSON list of PubMedVision or eval-format records")
    texts = [t for t in (record_text(_pairs(r)) for r in records) if t]
    if not texts:
        raise HuatuoError(f"{path} holds no question/answer records; give PubMedVision-format records "
                          "('conversations') or eval-format records ('question', 'options', 'answer').")
    return "".join(texts), len(texts)


# ---------------------------------------------------------------- tools ----
def _threads(threads: int) -> int:
    return threads if threads > 0 else (os.cpu_count() or 1)


def compute_imatrix(model_gguf: Path, calib_txt: Path, out: Path, threads: int = 0,
                    ctx: int = IMATRIX_CTX) -> dict:
    """Run llama-imatrix; returns what the imatrix GGUF says about itself."""
    run_tool("llama-imatrix", ["-m", model_gguf, "-f", calib_txt, "-o", out, "-c", ctx,
                               "-t", _threads(threads), "--no-ppl", "--output-frequency", 1_000_000],
             timeout=TOOL_TIMEOUT_S)
    if not out.is_file():
        raise HuatuoError(f"llama-imatrix wrote no {out.name}; run it by hand to see why.")
    return read_imatrix_info(out)


def read_imatrix_info(path: Path) -> dict:
    """chunk_count / chunk_size / entries of an imatrix GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def scalar(key):
        field = reader.fields.get(key)
        return int(field.parts[field.data[0]][0]) if field is not None else None

    return {"chunks": scalar("imatrix.chunk_count"), "chunk_size": scalar("imatrix.chunk_size"),
            "entries": len(reader.tensors) // 2}   # two tensors per weight: in_sum2 and counts


def quantize_with_imatrix(src: Path, dst: Path, quant: str, calibration, threads: int = 0,
                          ctx: int = IMATRIX_CTX) -> dict:
    """src (a lossless GGUF) -> dst quantized with an importance matrix computed on the
    calibration records; returns the manifest record. Temporary files live beside dst."""
    for tool in ("llama-imatrix", "llama-quantize"):
        find_tool(tool)   # one sentence on how to build them, before any work
    text, n_records = calibration_text(calibration)
    calib_txt, imatrix_file = dst.with_name(f".{dst.name}.calib.txt"), dst.with_name(f".{dst.name}.imatrix.gguf")
    try:
        calib_txt.write_text(text, encoding="utf-8")
        info = compute_imatrix(src, calib_txt, imatrix_file, threads, ctx)
        run_tool("llama-quantize", ["--imatrix", imatrix_file, src, dst, quant, _threads(threads)],
                 timeout=TOOL_TIMEOUT_S)
    finally:
        calib_txt.unlink(missing_ok=True)
        imatrix_file.unlink(missing_ok=True)
    if not dst.is_file():
        raise HuatuoError(f"llama-quantize wrote no {dst.name}; run it by hand to see why.")
    return {"calibration": Path(calibration).name, "calibration_sha256": sha256_file(Path(calibration)),
            "records": n_records, "ctx": ctx, **info,
            "llama_cpp": tool_version("llama-imatrix")}   # llama-quantize has no --version; one build
