"""Fidelity: compare specs, the answer-token KL, the card, and the first-position
log-probs on a tiny torch model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from huatuo_lite.eval import fidelity
from huatuo_lite.errors import HuatuoError
from huatuo_lite.eval.run import compact_logprobs, load_items, log_softmax


def _converted(folder: Path, fmt: str, *quants, mmproj: str = "F16") -> Path:
    """A converted folder's manifest as the converters write it."""
    folder.mkdir(parents=True)
    files = {f"m-{q}.bin": {"role": "text", "quant": q, "size": 0, "sha256": ""} for q in quants}
    manifest = {"format": fmt, "files": files}
    if fmt == "gguf":
        files["mmproj.gguf"] = {"role": "mmproj", "quant": mmproj, "size": 0, "sha256": ""}
    else:
        manifest["onnx"] = {"quant": quants[0], "vision_quant": "int8"}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def test_specs_find_their_folders(tmp_path):
    model = tmp_path / "upstream"
    model.mkdir()
    q8 = _converted(tmp_path / "gguf" / "q8", "gguf", "Q8_0")
    q4 = _converted(tmp_path / "gguf" / "q4", "gguf", "Q4_K_M", mmproj="Q8_0")   # mmproj quant: no match
    int8 = _converted(tmp_path / "onnx-int8", "onnx", "int8")
    specs = fidelity.parse_specs(f"gguf:q8_0,reference,onnx:int8,gguf:Q4_K_M={q4}", model)
    assert [(s.name, s.backend, s.path) for s in specs] == [
        ("reference", "torch", model), ("gguf:q8_0", "gguf", q8), ("onnx:int8", "onnx", int8),
        ("gguf:Q4_K_M", "gguf", q4)]
    assert specs[1].slug == "gguf-q8_0"
    assert fidelity.QUANT_OPTIONS["gguf"](specs[1].quant) == {"quant": "q8_0"}


@pytest.mark.parametrize("text, words", [
    ("gguf:Q8_0", "reference"),                 # no reference
    ("reference,onnx:int4", "No onnx folder"),
    ("reference,gguf:Q5_K_M", "No gguf folder"),
    ("reference,gguf", "Unknown compare spec"),
    ("reference,tflite:int8", "Unknown compare spec"),
    ("reference,gguf:Q8_0,gguf:Q8_0", "twice"),
])
def test_bad_specs_get_one_sentence(tmp_path, text, words):
    (tmp_path / "upstream").mkdir()
    _converted(tmp_path / "a", "gguf", "Q8_0")
    with pytest.raises(HuatuoError, match=words):
        fidelity.parse_specs(text, tmp_path / "upstream")


def test_two_matching_folders_are_ambiguous(tmp_path):
    (tmp_path / "upstream").mkdir()
    _converted(tmp_path / "a", "gguf", "Q8_0")
    _converted(tmp_path / "b", "gguf", "Q8_0", "Q4_K_M")
    with pytest.raises(HuatuoError, match="Several"):
        fidelity.parse_specs("reference,gguf:Q8_0", tmp_path / "upstream")


def _exact_kl(p_logits, q_logits):
    p, q = np.exp(log_softmax(p_logits)), np.exp(log_softmax(q_logits))
    return float(np.sum(p * np.log(p / q)))


def test_kl_is_exact_when_the_kept_tokens_hold_the_mass():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=50) * 3
    cand = ref + rng.normal(size=50) * 0.3
    kept_ref = compact_logprobs(log_softmax(ref))                   # 50 < TOP_LOGPROBS: all of them
    kept_cand = compact_logprobs(log_softmax(cand), kept_ref["ids"])
    assert fidelity.kl_divergence(kept_ref, kept_cand) == pytest.approx(_exact_kl(ref, cand), rel=1e-9)
    assert fidelity.kl_divergence(kept_ref, kept_ref) == pytest.approx(0.0, abs=1e-12)


def test_truncated_kl_is_a_lower_bound_with_a_rest_bucket():
    rng = np.random.default_rng(1)
    ref, cand = rng.normal(size=5000), rng.normal(size=5000)
    kept_ref = compact_logprobs(log_softmax(ref))
    kept_cand = compact_logprobs(log_softmax(cand), kept_ref["ids"])
    assert len(kept_ref["ids"]) == 64 and set(kept_ref["ids"]) <= set(kept_cand["ids"])
    approx, exact = fidelity.kl_divergence(kept_ref, kept_cand), _exact_kl(ref, cand)
    assert 0.0 < approx <= exact + 1e-12


def test_fidelity_row_and_card(tmp_path):
    ref = {i: {"letter": "A", "logprobs": {"ids": [0, 1], "values": [math.log(0.5), math.log(0.5)]}}
           for i in range(4)}
    cand = {i: {"letter": "A" if i < 3 else None,
                "logprobs": {"ids": [0, 1], "values": [math.log(0.25), math.log(0.75)]}} for i in range(4)}
    report = {"total": {"count": 4, "accuracy": 0.5, "chance": 0.5, "unparsed": 1}}
    spec = fidelity.Spec("gguf:Q4_K_M", "gguf", "Q4_K_M", tmp_path)
    row = fidelity.fidelity_row(spec, report, cand, ref)
    assert row["agreement"] == 0.75
    assert row["mean_kl"] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    ref_row = {**row, "spec": "reference", "accuracy": 0.75, "agreement": 1.0, "mean_kl": 0.0}
    card = fidelity.write_fidelity_card(tmp_path, [ref_row, row], data="eval/eval.json").read_text("utf-8")
    assert "| gguf:Q4_K_M | 4 | 50.0 | -25.0 | 75.0 |" in card
    assert "chance level 50.0%" in card
    assert "![Accuracy and agreement with the reference per model](fidelity.png)" in card
    assert not list(tmp_path.glob(".*partial*"))


def test_fidelity_chart_bars_follow_the_numbers(tmp_path):
    """fidelity.png: one accuracy and one agreement bar per model, each as long as its value
    on the 0-100 % axis (measured in the image's pixels), drawn with Pillow."""
    from PIL import Image

    from huatuo_lite.eval.fidelity_chart import BAR_H, GAP, SERIES, TOP, _x, write_chart

    rows = [{"spec": "reference", "accuracy": 0.9, "agreement": 1.0, "chance": 0.4},
            {"spec": "gguf:Q4_K_M", "accuracy": 0.55, "agreement": 0.7, "chance": 0.4}]
    image = Image.open(write_chart(tmp_path, rows)).convert("RGB")
    for r, row in enumerate(rows):
        for s, (key, _, colour) in enumerate(SERIES):
            y = TOP + r * (len(SERIES) * BAR_H + GAP) + s * BAR_H + BAR_H // 2
            xs = [x for x in range(image.width) if image.getpixel((x, y)) == colour]
            assert xs and xs[0] == _x(0) and xs[-1] == _x(row[key]), (row["spec"], key)


def test_no_eval_set_no_card(tmp_path):
    assert fidelity.card_after_convert(tmp_path / "src", tmp_path / "out", "gguf", "Q8_0") is None


# ------------------------------------------------------- tiny torch model ----
@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    from huatuo_lite.convert.synth.make import make_synthetic_set

    return make_synthetic_set(tmp_path_factory.mktemp("fid-set"), n_train=0, n_val=0, n_test=1, seed=5)


def test_compare_on_a_tiny_model(tiny_7b, synth_set, tmp_path):
    """The same model as 'candidate': full agreement, zero KL, and the kept
    log-probs are the helper's first-position log-probs."""
    specs = [fidelity.Spec("reference", "torch", None, Path(tiny_7b)),
             fidelity.Spec("gguf:same", "torch", None, Path(tiny_7b))]
    rows = fidelity.compare(specs, synth_set["test_vqa"], tmp_path, limit=2, progress=False, max_new_tokens=2)
    assert [r["spec"] for r in rows] == ["reference", "gguf:same"]
    assert rows[1]["agreement"] == 1.0 and rows[1]["mean_kl"] == pytest.approx(0.0, abs=1e-9)
    assert rows[1]["count"] == 2 and (tmp_path / "FIDELITY.md").is_file()
    assert json.loads((tmp_path / "fidelity.json").read_text("utf-8")) == rows

    from huatuo_lite.api import load

    item = load_items(synth_set["test_vqa"], limit=1)[0][0]
    kept = json.loads((tmp_path / "reference" / "results.jsonl").read_text("utf-8").splitlines()[0])["logprobs"]
    with load(tiny_7b) as hv:
        logprobs = fidelity.item_logprobs(hv.engine, item)
    assert abs(np.exp(logprobs).sum() - 1.0) < 1e-6
    np.testing.assert_allclose(logprobs[kept["ids"]], kept["values"], atol=1e-5)
