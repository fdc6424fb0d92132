"""Vision graph dtype on the real CLIP-L shape (issue #19 item 4): session memory, encode
time and fidelity of vision.onnx in fp32, fp16 (weights cast in the graph) and int8
(MatMulNBits), each in a fresh child process.

  python bench/vision_dtype.py [--profile-dir ~/.cache/huatuo-lite-bench/small] [--rounds 2]

The fp32 graph is the profile's gguf-Q4_K_M/vision.onnx; fp16 and int8 are exported once
from its checkpoint into <profile>/vision-dtype/. Per row: RssAnon (/proc/self/status)
before the session, after creating it and after the encodes, and VmRSS (anonymous + mapped
weights) at the end; seconds of a first and a second
encode of one 336x336 image (models/examples/chest_xray.png as the runtime preprocesses
it); then per-token cosine / max abs diff of the features to fp32's. fp16 is opened with the
runtime's plan for it (CAST_WEIGHTS_PLAN) and with onnxruntime's defaults. Rows alternate order per round; `uptime` is printed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_anon_mb(key: str = "RssAnon:") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


# the fp16 graph under other session plans than the runtime's (LEVEL:disabled,...:ORDER)
FP16_VARIANTS = ("ORT_ENABLE_ALL:ConstantFolding:DEFAULT", "ORT_DISABLE_ALL::DEFAULT",
                 "ORT_ENABLE_BASIC:ConstantFolding:DEFAULT", "ORT_ENABLE_EXTENDED:ConstantFolding:PRIORITY_BASED")


def _plan(name: str):
    """A plan of vision_onnx by name, or LEVEL:disabled,...:ORDER."""
    from huatuo_lite.backends import vision_onnx

    if ":" not in name:
        return getattr(vision_onnx, name)
    level, disabled, order = name.split(":")
    return vision_onnx.SessionPlan(level, tuple(d for d in disabled.split(",") if d), order)


def child(graph: str, threads: int, plan: str, out: str) -> None:
    from huatuo_lite.backends import vision_onnx
    from huatuo_lite.image.load import preprocess

    pixels = preprocess([ROOT / "models" / "examples" / "chest_xray.png"])     # [1, 3, 336, 336]
    before = rss_anon_mb()
    start = time.perf_counter()
    session = vision_onnx.make_session(graph, threads, plan=_plan(plan))
    load_s = time.perf_counter() - start
    after_session = rss_anon_mb()
    name = session.get_inputs()[0].name
    times = []
    for _ in range(2):
        start = time.perf_counter()
        (feats,) = session.run(None, {name: pixels})
        times.append(time.perf_counter() - start)
    np.save(out, feats)
    print(json.dumps({"before": before, "session": after_session, "encoded": rss_anon_mb(),
                      "rss": rss_anon_mb("VmRSS:"), "load_s": load_s,
                      "encode_s": times}))


def export(ckpt_dir: Path, out: Path, dtype: str) -> Path:
    from convert.checkpoint.read import open_checkpoint
    from convert.onnx.vision_stream import export_vision_streamed

    path = out / dtype / "vision.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_vision_streamed(open_checkpoint(ckpt_dir), path, dtype)
    return path


def _row(graphs: dict, work: Path, dtype: str, plan: str, threads: int) -> None:
    out = work / f"features-{dtype}-{plan.replace(':', '_').replace(',', '+')}.npy"
    line = subprocess.run([sys.executable, __file__, "--child", str(graphs[dtype]), str(threads), plan, str(out)],
                          capture_output=True, text=True, check=True).stdout
    m = json.loads(line.strip().splitlines()[-1])
    print(f"  {dtype} {plan} t={threads}: anon {m['before']:.0f} -> {m['session']:.0f} "
          f"-> {m['encoded']:.0f} MB (VmRSS {m['rss']:.0f}), load {m['load_s']:.2f} s, encode "
          f"{m['encode_s'][0]:.2f}/{m['encode_s'][1]:.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile-dir", type=Path, default=Path.home() / ".cache/huatuo-lite-bench/small")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--fp16-variants", action="store_true",
                        help="also run the fp16 graph once per FP16_VARIANTS plan (why CAST_WEIGHTS_PLAN)")
    args = parser.parse_args()
    work = args.profile_dir / "vision-dtype"
    graphs = {"fp32": args.profile_dir / "gguf-Q4_K_M" / "vision.onnx",
              "fp16": export(args.profile_dir / "ckpt", work, "fp16"),
              "int8": export(args.profile_dir / "ckpt", work, "int8")}
    rows = [("fp32", "DEFAULT_PLAN"), ("fp16", "CAST_WEIGHTS_PLAN"), ("fp16", "DEFAULT_PLAN"),
            ("int8", "DEFAULT_PLAN")]
    for r in range(args.rounds):
        print("round", r + 1, subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
        for threads in args.threads:
            for dtype, plan in (rows if r % 2 == 0 else rows[::-1]):
                _row(graphs, work, dtype, plan, threads)
    if args.fp16_variants:
        for plan in FP16_VARIANTS:
            _row(graphs, work, "fp16", plan, max(args.threads))
    from convert.onnx.vision_dtype import gate, token_agreement

    ref = np.load(work / "features-fp32-DEFAULT_PLAN.npy")
    for name in ("fp16-CAST_WEIGHTS_PLAN", "fp16-DEFAULT_PLAN", "int8-DEFAULT_PLAN"):
        print(name, "chest X-ray:", token_agreement(ref, np.load(work / f"features-{name}.npy")))
    for dtype in ("fp16", "int8"):       # the conversion's gate: all three probe images
        print(dtype, "gate:", gate(graphs["fp32"], graphs[dtype], dtype, 336, threads=max(args.threads)))
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
