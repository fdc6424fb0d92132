"""int4's algorithms (issue #21): each quantizes the tiny 7B and the model answers
close to the torch reference; the per-tensor kernels give the same bytes on row
chunks as on the whole matrix; bad combinations are one sentence."""
from __future__ import annotations

import json

import numpy as np
import pytest

from support.engines import open_onnx, prompt_segments, skip_without
skip_without('torch', 'onnx', 'onnxruntime')

from huatuo_lite.backends.base import ImageEmbeds
from huatuo_lite.errors import HuatuoError

ANSWER = "The chest radiograph shows a right lower lobe consolidation consistent with pneumonia."
# label -> export options. Bounds as test_onnx_quant's int4 (random tiny weights: flat
# distributions, a fragile top-1): >= 0.45 top-1 agreement, mean KL <= 1e-2.
CASES = {
    "default-asym": dict(algorithm="default", symmetric=False, keep_int8="none"),
    "rtn-sym": dict(algorithm="rtn", symmetric=True, keep_int8="none"),
    "rtn-asym": dict(algorithm="rtn", symmetric=False, keep_int8="none"),
    "k_quant": dict(algorithm="k_quant", keep_int8="none"),
    "hqq": dict(algorithm="hqq", keep_int8="none"),
    "gptq": dict(algorithm="gptq", calibrated=True),
    "k_quant-mixed-embed16-b16": dict(algorithm="k_quant", keep_int8="mixed", embed_quant="fp16", block_size=16),
    "default-lm_head-b64": dict(algorithm="default", keep_int8="lm_head", block_size=64),
    "int4-default": dict(),                      # INT4_DEFAULT: k_quant, mixed, fp16 table
}
MIN_TOP1, MAX_KL = 0.45, 1e-2
# what the decoder's MatMulNBits nodes read: zero points or not (the algorithm's kind)
ZERO_POINTS = {"default-asym": True, "rtn-sym": False, "rtn-asym": True, "k_quant": True, "hqq": True,
               "gptq": False, "k_quant-mixed-embed16-b16": True, "default-lm_head-b64": False,
               "int4-default": True}


def _log_softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _agreement(ref, q):
    lp, lq = _log_softmax(ref), _log_softmax(q)
    return float((ref.argmax(-1) == q.argmax(-1)).mean()), float((np.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """PubMedVision-format records (never the scored questions)."""
    path = tmp_path_factory.mktemp("calib") / "calib.json"
    records = [{"image": [f"images/{i}.png"], "conversations": [
        {"from": "human", "value": f"<image>\nWhat does image {i} show? Describe the lesion."},
        {"from": "gpt", "value": f"A small round lesion in the {'left' if i % 2 else 'right'} upper field."}]}
        for i in range(12)]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def teacher_forced(ref_7b, pixels):
    segments = prompt_segments(ref_7b, ref_7b.encode_images(pixels[:1])) + [ref_7b.tokenize(ANSWER)]
    return segments, ref_7b.prefill(segments, all_logits=True)


@pytest.mark.parametrize("label", sorted(CASES))
def test_each_algorithm_quantizes_and_answers(label, tiny_7b, tmp_path, calibration, teacher_forced, pixels):
    import onnx

    from huatuo_lite.convert.onnx.export import export_onnx

    options = dict(CASES[label])
    if options.pop("calibrated", False):
        options["calibration"] = calibration
    from huatuo_lite.convert.onnx.algorithms import INT4_DEFAULT

    export_onnx(tiny_7b, tmp_path / "out", quant="int4", **options)
    options = {**INT4_DEFAULT, **({"keep_int8": "none"} if options.get("algorithm") == "gptq" else {}), **options}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["onnx"]["int4"]["algorithm"] == options["algorithm"]
    assert manifest["onnx"]["embed_quant"] == options["embed_quant"]
    nodes = [n for n in onnx.load(str(tmp_path / "out" / "decoder.onnx")).graph.node if n.op_type == "MatMulNBits"]
    bits = {next(a.i for a in n.attribute if a.name == "bits") for n in nodes}
    assert bits == ({4} if options["keep_int8"] == "none" else {4, 8})
    four = [n for n in nodes if next(a.i for a in n.attribute if a.name == "bits") == 4]
    assert {len(n.input) == 4 for n in four} == {ZERO_POINTS[label]}
    engine = open_onnx(tmp_path / "out")
    segments, ref = teacher_forced
    features = engine.encode_images(pixels[:1])
    logits = engine.prefill([ImageEmbeds(features[0]) if isinstance(s, ImageEmbeds) else s for s in segments],
                            all_logits=True)
    top1, kl = _agreement(ref, logits)
    base_top1, base_kl = _agreement(ref[1:], ref[:-1])        # a wrong model: the reference shifted by one
    print(f"{label}: top-1 {top1:.3f}, mean KL {kl:.2e} (wrong model: {base_top1:.3f}, {base_kl:.2e})")
    assert top1 >= MIN_TOP1 and kl <= MAX_KL
    assert top1 > base_top1 and kl < base_kl / 10


@pytest.mark.parametrize("algorithm,symmetric", [("default", True), ("default", False), ("rtn", True),
                                                 ("rtn", False), ("k_quant", False), ("hqq", False)])
def test_kernels_are_per_column(algorithm, symmetric):
    """Row chunks of W [N, K] quantize to the bytes of the whole matrix (what lets
    onnx_stream quantize a 7B's lm_head in pieces), and dequantize close to W."""
    from huatuo_lite.convert.onnx.algorithms import quantize_rows

    w = np.random.default_rng(1).standard_normal((10, 80)).astype(np.float32)   # K=80: a padded last block
    from huatuo_lite.convert.onnx.algorithms import WHOLE_MATRIX

    whole = quantize_rows(algorithm, w, 32, 4, symmetric)
    parts = [quantize_rows(algorithm, w[i:i + 3], 32, 4, symmetric) for i in range(0, 10, 3)]
    for index, array in enumerate(whole if algorithm not in WHOLE_MATRIX else ()):     # hqq: never chunked
        if array is None:
            assert all(p[index] is None for p in parts)
            continue
        np.testing.assert_array_equal(array, np.concatenate([p[index] for p in parts]))
    packed, scales, zp = whole
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(10, -1, 32).astype(np.float32)   # [N, blocks, 32]
    if zp is None:
        zero = np.full(scales.shape, 8.0)
    elif zp.dtype == np.uint8:
        zero = np.stack([zp & 15, zp >> 4], -1).reshape(10, -1)[:, :scales.shape[1]].astype(np.float32)
    else:
        zero = zp
    back = ((codes - zero[..., None]) * scales[..., None]).reshape(10, -1)[:, :80]
    rel = np.abs(back - w).mean() / np.abs(w).mean()
    assert rel < 0.15, rel


BAD = [
    (dict(algorithm="gptq"), "--algorithm gptq needs calibration records: pass --calibration"),
    (dict(algorithm="gptq", calibration="CALIB", keep_int8="lm_head"), "gptq cannot keep parts at 8 bits"),
    (dict(block_size=48), "--block-size 48 is not supported: use a power of two >= 16"),
    (dict(algorithm="awq"), "--algorithm 'awq' is not supported: choose one of default, rtn, k_quant, hqq, gptq."),
    (dict(algorithm="k_quant", symmetric=True), "--algorithm k_quant is asymmetric only: drop --symmetric."),
    (dict(algorithm="k_quant", calibration="CALIB"), "--calibration is used only by --algorithm gptq"),
    (dict(algorithm="gptq", calibration="CALIB", keep_int8="mixed"), "--algorithm gptq cannot keep parts at 8 bits"),
    (dict(keep_int8="half"), "--keep-int8 'half' is not supported: choose one of none, lm_head, mixed."),
    (dict(quant="int8", algorithm="hqq"), "--algorithm applies to --quant int4 only; drop it for --quant int8."),
    (dict(algorithm="k_quant", symmetric=True, keep_int8="none"), "k_quant is asymmetric only"),
    (dict(quant="int8", embed_quant="int4"), "--embed-quant int4 is not supported with --quant int8: use fp16."),
    (dict(algorithm="gptq", calibration="MISSING"), "Calibration file MISSING does not exist"),
]


@pytest.mark.parametrize("options,sentence", BAD, ids=[s[:24] for _, s in BAD])
def test_bad_combinations_are_one_sentence(options, sentence, tiny_7b, tmp_path, calibration):
    from huatuo_lite.convert.onnx.export import export_onnx

    options = {k: (str(calibration) if v == "CALIB" else str(tmp_path / v) if v == "MISSING" else v)
               for k, v in options.items()}
    sentence = sentence.replace("MISSING", str(tmp_path / "MISSING"))
    with pytest.raises(HuatuoError) as caught:
        export_onnx(tiny_7b, tmp_path / "out", **{"quant": "int4", **options})
    assert sentence in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_names_a_bad_combination(tiny_7b, tmp_path):
    from click.testing import CliRunner

    from huatuo_lite.cli.main import cli

    result = CliRunner().invoke(cli, ["convert", "onnx", str(tiny_7b), str(tmp_path / "out"),
                                      "--algorithm", "gptq"])
    assert result.exit_code == 1, result.output
    assert "needs calibration records" in result.output and "Traceback" not in result.output
    unknown = CliRunner().invoke(cli, ["convert", "onnx", str(tiny_7b), str(tmp_path / "out"), "--algorithm", "awq"])
    assert unknown.exit_code == 2 and "'awq' is not one of" in unknown.output
