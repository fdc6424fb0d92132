"""Package a trained demo model as the shipped folder (models/demo/):

    checkpoint/   the upstream-format trained checkpoint (bf16 shards, 7B layout)
    gguf/         Q8_0 text + F16 mmproj + vision.onnx + manifest (export_gguf)
    onnx/         int8 decoder/embed + vision graph (export_onnx)
    eval/         the held-out test split in the upstream eval layout (eval.json + images/)
    FIDELITY.md   `huatuo-lite eval --compare reference,gguf:Q8_0,gguf:Q4_K_M,onnx:int8,onnx:int4`
    MODEL_CARD.md what it is and is not, how it was built (demo_card: filled from the training
                  log and the build's reference eval report, BUILD/eval-test/report.json)

The Q4_K_M and int4 forms are built in a scratch folder for the comparison only.

    python -m huatuo_lite.convert.demo.package TRAINED_MODEL_DIR models/demo [--scratch /tmp/x]
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from huatuo_lite.errors import HuatuoError
from huatuo_lite.eval.fidelity import EVAL_SET, FIDELITY_CARD
from huatuo_lite.eval.fidelity_chart import FIDELITY_CHART

SHIPPED = {"gguf": ("gguf", "Q8_0"), "onnx": ("onnx", "int8")}        # folder -> (format, quant)
COMPARED_ONLY = {"q4": ("gguf", "Q4_K_M"), "int4": ("onnx", "int4")}
COMPARE_ORDER = ("reference", "gguf:Q8_0", "gguf:Q4_K_M", "onnx:int8", "onnx:int4")
TRAINING_EXTRAS = ("train_log.json", "checkpoints")                    # not part of the checkpoint shipped


# The demo's identity in its files (GGUF general.*, card, Modelfile): our own model, Apache-2.0,
# no upstream base model.
DEMO_IDENTITY = dict(name="huatuo-lite-demo", base_repo=None, license="apache-2.0")


def _export(fmt: str, quant: str, src: Path, out: Path) -> None:
    if fmt == "gguf":
        from ..gguf.export import export_gguf

        export_gguf(src, out, quant=quant, threads=2, **DEMO_IDENTITY)
    else:
        from ..onnx.export import export_onnx

        export_onnx(src, out, quant=quant, **DEMO_IDENTITY)


def _copy_checkpoint(model: Path, target: Path) -> None:
    """The trained folder minus its eval set and training extras (kept beside it)."""
    ignore = shutil.ignore_patterns(EVAL_SET.parts[0], *TRAINING_EXTRAS)
    shutil.copytree(model, target, ignore=ignore)


def _write_model_card(model: Path, work: Path, demo_args: str) -> None:
    from .card import fill_card

    report_path = model.parent / "eval-test" / "report.json"
    if not report_path.is_file():
        raise HuatuoError(f"{report_path} is missing: package a model built by `python -m "
                          "huatuo_lite.convert.demo.build`, which evaluates it there.")
    train_log = json.loads((model / "train_log.json").read_text(encoding="utf-8"))
    report = json.loads(report_path.read_text(encoding="utf-8"))
    card = fill_card(work / "checkpoint", train_log, report, demo_args)
    (work / "MODEL_CARD.md").write_text(card, encoding="utf-8")


def package_demo(model, dest, scratch=None, progress: bool = True, limit: int | None = None,
                 demo_args: str = "") -> list:
    """Write dest (an existing one is replaced once the new folder is complete) from a
    trained demo model folder that holds its test split as EVAL_SET; returns the
    comparison's rows (fidelity.json).
    limit: compare on the first N questions only (a dry run)."""
    from huatuo_lite.eval.fidelity import compare, parse_specs

    model, dest = Path(model), Path(dest)
    scratch = Path(scratch or tempfile.mkdtemp(prefix="demo-compare-"))
    work = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    _copy_checkpoint(model, work / "checkpoint")
    shutil.copytree((model / EVAL_SET).parent, work / "eval")
    folders = {}
    for name, (fmt, quant) in {**SHIPPED, **COMPARED_ONLY}.items():
        folders[f"{fmt}:{quant}"] = (work if name in SHIPPED else scratch) / name
        _export(fmt, quant, work / "checkpoint", folders[f"{fmt}:{quant}"])
    specs_text = ",".join(spec if spec == "reference" else f"{spec}={folders[spec]}" for spec in COMPARE_ORDER)
    specs = parse_specs(specs_text, str(work / "checkpoint"), None)
    rows = compare(specs, work / "eval" / "eval.json", scratch / "compare", limit=limit, progress=progress)
    card = (scratch / "compare" / FIDELITY_CARD).read_text(encoding="utf-8")
    (work / FIDELITY_CARD).write_text(card.replace(f"{work.absolute()}/", ""), encoding="utf-8")
    chart = scratch / "compare" / FIDELITY_CHART
    if chart.is_file():                      # linked from FIDELITY.md
        shutil.copy2(chart, work / FIDELITY_CHART)
    _write_model_card(model, work, demo_args)
    if dest.exists():
        shutil.rmtree(dest)
    work.rename(dest)
    return rows


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Package a trained demo model as models/demo/.")
    parser.add_argument("model")
    parser.add_argument("dest")
    parser.add_argument("--scratch")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--demo-args", default="", help="the commands the model was built with (for the card)")
    args = parser.parse_args(argv)
    rows = package_demo(args.model, args.dest, args.scratch, limit=args.limit, demo_args=args.demo_args)
    print(json.dumps(rows, indent=1)[:4000])


if __name__ == "__main__":
    main()
