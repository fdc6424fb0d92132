"""Does an importance matrix make Q4_K_M / Q4_0 closer to the unquantized model?

    python native/imatrix_fidelity.py MODEL_DIR CALIB.json HELD_OUT.json OUT_DIR [--quants Q4_K_M Q4_0]

Converts MODEL_DIR to an F32 GGUF (the reference) and, per quant, without and with
`--imatrix CALIB.json`; then, on held-out questions (an eval-format or PubMedVision
JSON, disjoint from the calibration records), teacher-forces prompt + the F32
model's greedy continuation through every quant and reports the top-1 agreement and
the mean KL(F32 || quant) of next-token distributions over all positions (text only:
the imatrix is computed on text). Needs the native tools (CMakeLists.txt).
With `--eval EVAL.json` it also converts complete folders (mmproj + vision.onnx) and
runs the eval harness (huatuo_lite.eval.fidelity.compare: accuracy, agreement and
first-answer-token KL against the torch reference, with images) on every quant.
One thread throughout; prints one JSON object per quant and a summary table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

CONTINUATION = 16      # greedy tokens of the F32 model appended to each prompt


def convert(src: Path, out: Path, quant: str, imatrix: Path | None = None, vision: bool = False) -> Path:
    from huatuo_lite.convert.gguf.export import export_gguf

    if not out.is_dir():
        export_gguf(src, out, quant=quant, vision_onnx=vision, threads=1, imatrix=imatrix)
    return out


def eval_rows(args) -> list[dict]:
    """fidelity.compare on complete conversions: reference (torch), then each quant +- imatrix."""
    from huatuo_lite.eval.fidelity import Spec, compare

    specs = [Spec("reference", "torch", None, args.model)]
    for quant in args.quants:
        for label, imatrix in (("plain", None), ("imatrix", args.calibration)):
            folder = convert(args.model, args.out / f"full-{quant}-{label}", quant, imatrix, vision=True)
            specs.append(Spec(f"gguf:{quant}{'+imatrix' if imatrix else ''}", "gguf", quant, folder))
    return compare(specs, args.eval, args.out / "eval", limit=args.eval_limit, progress=False,
                   temperature=0.0, max_new_tokens=4)


def held_out_questions(path: Path, limit: int) -> list[str]:
    from huatuo_lite.convert.gguf.imatrix import _pairs

    records = json.loads(path.read_text(encoding="utf-8"))
    questions = [q.replace("<image>", "").strip() for r in records for q, _ in _pairs(r)]
    return [q for q in questions if q][:limit]


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def reference_runs(engine, questions) -> list[tuple[list, np.ndarray]]:
    """Per question: prompt ids + the reference's greedy continuation, and its log-probs."""
    from huatuo_lite.prompt import Turn, build_segments

    runs = []
    for question in questions:
        ids = list(build_segments([Turn(question=question)], engine.tokenize, [])[0])
        logits = engine.prefill([ids])
        for _ in range(CONTINUATION):
            token = int(np.argmax(logits))
            ids.append(token)
            logits = engine.step(token)
        runs.append((ids, log_softmax(engine.prefill([ids], all_logits=True))))
    return runs


def fidelity(engine, runs) -> dict:
    top1, kls = [], []
    for ids, log_p in runs:
        log_q = log_softmax(engine.prefill([ids], all_logits=True))
        top1.append(log_p.argmax(-1) == log_q.argmax(-1))
        kls.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
    return {"top1_agreement": float(np.concatenate(top1).mean()), "mean_kl": float(np.concatenate(kls).mean()),
            "positions": int(sum(len(t) for t in top1))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calibration", type=Path)
    parser.add_argument("held_out", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--quants", nargs="+", default=["Q4_K_M", "Q4_0"])
    parser.add_argument("--limit", type=int, default=24, help="held-out questions")
    parser.add_argument("--eval", type=Path, help="also run the eval harness on this eval-format JSON")
    parser.add_argument("--eval-limit", type=int, default=None)
    args = parser.parse_args(argv)

    from huatuo_lite.backends import load_backend

    open_engine = load_backend("gguf").open_engine
    reference = open_engine(convert(args.model, args.out / "F32", "F32"), threads=1)
    runs = reference_runs(reference, held_out_questions(args.held_out, args.limit))
    reference.close()
    rows = []
    for quant in args.quants:
        for label, imatrix in (("plain", None), ("imatrix", args.calibration)):
            start = time.perf_counter()
            folder = convert(args.model, args.out / f"{quant}-{label}", quant, imatrix)
            engine = open_engine(folder, threads=1)
            row = {"quant": quant, "imatrix": label == "imatrix", **fidelity(engine, runs),
                   "convert_s": round(time.perf_counter() - start, 1)}
            engine.close()
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| quant | imatrix | top-1 agreement | mean KL |\n|---|---|---|---|")
    for row in rows:
        imatrix = "yes" if row["imatrix"] else "no"
        print(f"| {row['quant']} | {imatrix} | {row['top1_agreement']:.4f} | {row['mean_kl']:.3e} |")
    if args.eval:
        print("| model | accuracy | agreement | mean KL (first answer token) |\n|---|---|---|---|")
        for row in eval_rows(args):
            print(f"| {row['spec']} | {row['accuracy']:.4f} | {row['agreement']:.4f} | {row['mean_kl']:.3e} |")


if __name__ == "__main__":
    main()
