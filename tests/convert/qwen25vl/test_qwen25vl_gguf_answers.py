"""The whole runtime path of a Qwen2.5-VL GGUF folder (image file -> smart_resize -> ChatML prompt
-> libmtmd image features -> llama.cpp with 3-D M-RoPE positions -> the shared sampler) answers as
transformers' own generate() token for token, greedy, with the checkpoint's repetition penalty
(which sees the prompt) and a strong one, for images of several sizes and aspect ratios, in both
tensor layouts; the torch backend too. Also: libmtmd keeps our image sizes (small ones included),
the prefix cache restores an image prefix with M-RoPE positions, and a stale self-test is refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
from qwen_helpers import LAYOUTS, noise_image, open_processor, user_message

from support.engines import skip_without

skip_without("torch", "transformers", "gguf", "llama_cpp")

MAX_NEW = 10
# (width, height): square, wide, tall, and one small enough that libmtmd would enlarge it
SIZES = ((336, 336), (448, 224), (200, 300), (60, 60))


@pytest.fixture(scope="module", params=LAYOUTS)
def folders(request, qwen_tiny_folders, tmp_path_factory):
    """(upstream folder, its F32 GGUF conversion) for one tensor layout."""
    from huatuo_lite.convert.qwen25vl.gguf import export_qwen25vl_gguf

    tiny = qwen_tiny_folders[request.param]
    out = tmp_path_factory.mktemp(f"qwen-gguf-answers-{request.param}")
    export_qwen25vl_gguf(tiny, out, quant="F32", mmproj_type="F32", threads=1)
    return tiny, out


@pytest.fixture(scope="module")
def hf_model(qwen_tiny_folders):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(1)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_tiny_folders[LAYOUTS[0]],
                                                              torch_dtype=torch.float32).eval()


def _images(tmp_path, sizes):
    paths = []
    for width, height in sizes:
        paths.append(tmp_path / f"scan-{width}x{height}.png")
        noise_image(width, height, seed=width + 7 * height).save(paths[-1])
    return paths


def _transformers_answer(hf_model, folder, paths, question, penalty) -> list:
    import torch
    from PIL import Image

    processor = open_processor(folder)
    text = processor.apply_chat_template([user_message(len(paths), question)], add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    with torch.inference_mode():
        out = hf_model.generate(**inputs, do_sample=False, repetition_penalty=penalty, max_new_tokens=MAX_NEW,
                                eos_token_id=eos, top_k=None, top_p=None, temperature=None)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(eos if isinstance(eos, list) else [eos])
    return tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))], inputs


def _ask(folder, backend, paths, question, **gen):
    from huatuo_lite import api

    model = api.load(str(folder), backend=backend, threads=1)
    try:
        return model.ask([str(p) for p in paths], question, temperature=0, max_new_tokens=MAX_NEW, **gen)
    finally:
        model.close()


@pytest.mark.parametrize("sizes", [SIZES[:1], SIZES[1:2], SIZES[2:3], SIZES[3:], SIZES[:3]],
                         ids=["336x336", "448x224", "200x300", "60x60", "three-images"])
def test_gguf_and_torch_answer_as_transformers(folders, hf_model, sizes, tmp_path):
    tiny, gguf = folders
    paths = _images(tmp_path, sizes)
    question = "What is shown?"
    want, inputs = _transformers_answer(hf_model, tiny, paths, question, penalty=1.05)
    assert want, "transformers gave an empty answer: the comparison would say nothing"
    for folder, backend in ((gguf, "gguf"), (tiny, "torch")):
        answer = _ask(folder, backend, paths, question)
        # the prompt holds what the processor made: image tokens follow smart_resize
        assert answer.prompt_tokens == inputs["input_ids"].shape[1], backend
        assert answer.token_ids == want, backend


def test_the_penalty_sees_the_prompt_as_in_transformers(folders, hf_model, tmp_path):
    tiny, gguf = folders
    paths = _images(tmp_path, SIZES[1:2])
    want, _ = _transformers_answer(hf_model, tiny, paths, "Describe it.", penalty=3.0)
    weak, _ = _transformers_answer(hf_model, tiny, paths, "Describe it.", penalty=1.0)
    assert want != weak, "penalty 3.0 does not change this answer: the test would prove nothing"
    assert _ask(gguf, "gguf", paths, "Describe it.", repetition_penalty=3.0).token_ids == want


def test_libmtmd_keeps_our_sizes(folders):
    """libmtmd resizes to its own token bounds (8..4096) unless told the model's: a 56x56 image
    (4 tokens) must stay 4 tokens, and the features equal the torch reference's."""
    from huatuo_lite import api
    from huatuo_lite.families import qwen25vl

    tiny, gguf = folders
    rng = np.random.default_rng(3)
    pixels = [rng.standard_normal((3, h, w)).astype(np.float32).clip(-1.7, 2.1) for h, w in ((56, 56), (84, 140))]
    ours, ref = api.load(str(gguf), threads=1), api.load(str(tiny), backend="torch", threads=1)
    try:
        from huatuo_lite.backends.gguf_mtmd import pixels_to_rgb8

        # libmtmd sees uint8: give both engines the same (quantised) pixels
        mean = np.asarray(qwen25vl.IMAGE_MEAN, np.float32).reshape(3, 1, 1)
        std = np.asarray(qwen25vl.IMAGE_STD, np.float32).reshape(3, 1, 1)
        exact = [(((pixels_to_rgb8(p[None])[0].transpose(2, 0, 1).astype(np.float64) / 255).astype(np.float32)
                   - mean) / std) for p in pixels]
        got, want = ours.engine.encode_images(exact), ref.engine.encode_images(exact)
        for g, w, p in zip(got, want, exact):
            assert len(g) == qwen25vl.image_tokens(p)
            cos = (g * w).sum(-1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(w, axis=-1))
            assert cos.min() > 0.9999
    finally:
        ours.close()
        ref.close()


def test_prefix_cache_restores_an_mrope_prefix(folders, tmp_path, monkeypatch):
    """A second process-like load answers a new question on the same image from the disk
    cache (KV state + features) exactly as a cold run."""
    from huatuo_lite import api

    monkeypatch.setenv("HUATUO_LITE_CACHE", str(tmp_path / "cache"))
    _, gguf = folders
    paths = _images(tmp_path, SIZES[1:2])
    cold = _ask(gguf, "gguf", paths, "Is there a lesion?")
    _ask(gguf, "gguf", paths, "What is shown?")            # writes the image prefix
    model = api.load(str(gguf), threads=1)
    try:
        warm = model.ask([str(p) for p in paths], "Is there a lesion?", temperature=0, max_new_tokens=MAX_NEW)
    finally:
        model.close()
    assert warm.timings["prefix_cache_hit"] == 1
    assert warm.token_ids == cold.token_ids


def test_a_stale_self_test_is_refused(folders, tmp_path):
    import shutil

    from huatuo_lite import api
    from huatuo_lite.errors import ModelFormatError

    _, gguf = folders
    copy = tmp_path / "copy"
    shutil.copytree(gguf, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["mtmd_self_test"]["llama_cpp_python"] = "0.0.1"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="convert the model again"):
        api.load(str(copy), threads=1)
