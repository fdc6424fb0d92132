"""int8 / int4 / fp16 ONNX models against the torch reference, teacher-forced.

Random tiny weights quantize far worse than trained ones (their next-token
distributions are nearly flat, so the top-1 is fragile); these bounds are
regression guards measured here, not the fidelity bar (that is set on the
trained demo model). Each quant must also beat a "wrong model" baseline: the
reference's own logits shifted by one position.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from support.engines import open_onnx, prompt_segments, skip_without
skip_without('torch', 'onnx', 'onnxruntime')

from huatuo_lite.backends.base import ImageEmbeds

ANSWER = "The chest radiograph shows a right lower lobe consolidation consistent with pneumonia."
# quant fixture -> (min top-1 agreement, max mean KL(ref || quant)); measured on the
# tiny 7B: int8 0.964 / 1.3e-5, int4 0.638 / 1.5e-3, fp16 0.998 / 1.9e-9.
BOUNDS = {
    "onnx_7b_int8": (0.85, 1e-4),
    "onnx_7b_int4": (0.45, 1e-2),
    "onnx_7b_fp16": (0.97, 1e-6),
}


def log_softmax(logits):
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def agreement(ref_logits, q_logits):
    """(top-1 agreement, mean KL(ref || q)) over positions."""
    lp, lq = log_softmax(ref_logits), log_softmax(q_logits)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return float((ref_logits.argmax(-1) == q_logits.argmax(-1)).mean()), float(kl.mean())


@pytest.fixture(scope="module")
def teacher_forced_ref(ref_7b, pixels):
    """Reference logits for one image + question + a fixed answer, every position."""
    segments = prompt_segments(ref_7b, ref_7b.encode_images(pixels[:1])) + [ref_7b.tokenize(ANSWER)]
    return segments, ref_7b.prefill(segments, all_logits=True)


@pytest.mark.parametrize("quant_fixture", sorted(BOUNDS))
def test_quantized_agreement_with_reference(quant_fixture, teacher_forced_ref, pixels, request):
    engine = open_onnx(request.getfixturevalue(quant_fixture))
    segments, ref_logits = teacher_forced_ref
    # the quantized model sees its own image features (vision graph quantized or not)
    features = engine.encode_images(pixels[:1])
    own = [ImageEmbeds(features[0]) if isinstance(s, ImageEmbeds) else s for s in segments]
    logits = engine.prefill(own, all_logits=True)
    top1, kl = agreement(ref_logits, logits)
    base_top1, base_kl = agreement(ref_logits[1:], ref_logits[:-1])
    rel = float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max())
    print(f"{quant_fixture}: top-1 {top1:.3f}, mean KL {kl:.2e}, max rel logit err {rel:.3f} "
          f"(wrong-model baseline: top-1 {base_top1:.3f}, KL {base_kl:.2e})")
    min_top1, max_kl = BOUNDS[quant_fixture]
    assert top1 >= min_top1 and kl <= max_kl
    assert top1 > base_top1 and kl < base_kl / 10


# quant -> largest decoder.onnx size as a fraction of the fp32 one (int4 packs
# 4-bit weights + fp32 scales per 32; the tiny graph's non-weight bytes count too)
SIZE_RATIO = {"int4": 0.3, "int8": 0.45, "fp16": 0.55}


@pytest.mark.parametrize("quant_fixture", sorted(BOUNDS))
def test_quantized_graphs_are_what_the_manifest_says(quant_fixture, onnx_7b, request):
    import onnx

    folder = request.getfixturevalue(quant_fixture)
    manifest = json.loads((folder / "manifest.json").read_text())
    quant = manifest["onnx"]["quant"]
    assert quant == quant_fixture.rsplit("_", 1)[-1]
    assert manifest["files"]["decoder.onnx"]["quant"] == quant
    ops = {n.op_type for n in onnx.load(str(folder / "decoder.onnx")).graph.node}
    assert ("MatMulNBits" in ops) == (quant in ("int4", "int8"))
    ratio = (folder / "decoder.onnx").stat().st_size / (onnx_7b / "decoder.onnx").stat().st_size
    print(f"{quant}: decoder.onnx is {ratio:.2f} of fp32")
    assert ratio < SIZE_RATIO[quant]


def test_quantized_step_matches_its_own_prefill(onnx_7b_int4, pixels):
    """The cached decode path of a quantized model equals its full prefill."""
    engine = open_onnx(onnx_7b_int4)
    segments = prompt_segments(engine, engine.encode_images(pixels[:1]))
    answer = engine.tokenize(ANSWER)[:6]
    full = engine.prefill(segments + [answer], all_logits=True)
    engine.prefill(segments)
    steps = np.stack([engine.step(t) for t in answer])
    np.testing.assert_allclose(steps, full[-len(answer):], rtol=0, atol=1e-3 * np.abs(full).max())
