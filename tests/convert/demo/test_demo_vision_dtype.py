"""The demo eval with the GGUF folder's vision graph in fp32, fp16 and auto's choice (issue #19
item 4: a smaller vision graph is the default only where no answer changes): every one of the
298 held-out answers is the same, and the shipped gguf/ folder holds what `auto` makes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.engines import skip_without
skip_without('torch', 'gguf', 'llama_cpp', 'onnx')

DEMO = Path(__file__).resolve().parents[3] / "models" / "demo"
DEMO_IDENTITY = dict(name="huatuo-lite-demo", base_repo=None, license="apache-2.0")


def _rows(out_dir: Path) -> list:
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(row["key"], row["output"], row["letter"]) for row in sorted(rows, key=lambda row: row["index"])]


@pytest.mark.long      # ~50-70 s: three conversions of the demo (~2 s each) and three evals of 298 questions (~14 s each); CI runs it after the default suite
@pytest.mark.skipif(not (DEMO / "gguf").is_dir(), reason="models/demo is not in this checkout")
def test_demo_answers_do_not_change_with_the_vision_dtype(tmp_path):
    from huatuo_lite.convert.gguf.export import export_gguf
    from huatuo_lite.eval.run import run_eval

    rows, manifests = {}, {}
    for dtype in ("fp32", "fp16", "auto"):
        folder = tmp_path / dtype
        export_gguf(DEMO / "checkpoint", folder, quant="Q8_0", threads=1, vision_dtype=dtype, **DEMO_IDENTITY)
        manifests[dtype] = json.loads((folder / "manifest.json").read_text())
        report = run_eval(folder, DEMO / "eval" / "eval.json", tmp_path / f"eval-{dtype}", backend="gguf",
                          progress=False, load_options={"threads": 1})
        assert report["total"]["unparsed"] == 0
        rows[dtype] = _rows(tmp_path / f"eval-{dtype}")
    assert len(rows["fp32"]) == 298
    assert rows["fp16"] == rows["fp32"]
    assert rows["auto"] == rows["fp32"]
    chosen = manifests["auto"]["vision_onnx"]
    assert chosen["gate"]["passed"] and chosen["dtype"] == "int8"
    shipped = json.loads((DEMO / "gguf" / "manifest.json").read_text())
    assert shipped["vision_onnx"]["dtype"] == chosen["dtype"]
    assert shipped["files"]["vision.onnx"]["sha256"] == manifests["auto"]["files"]["vision.onnx"]["sha256"]
