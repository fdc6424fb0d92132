"""The Qwen2.5-VL ONNX export on the tiny checkpoint against transformers' own model:
the vision graph (with the runtime's numpy window order, rotary table and masks) equals
model.visual for images of three sizes/aspects, the decoder's logits with the runtime's 3-D
positions equal the model's forward with its own get_rope_index, greedy answers over two
images of different sizes equal generate() token for token (repetition penalty on prompt +
generated, as HF), int8 loads and answers, and bad input is one sentence."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from support.engines import skip_without

skip_without("torch", "transformers", "onnxruntime")

from huatuo_lite.families import qwen25vl as fam  # noqa: E402

# (height, width) given to smart_resize -> 56x84 (one window), 112x112, 168x56, and a
# 252x364 image whose 9x13 merged grid is cut into 3x4 windows (edge windows partial)
SIZES = ((56, 84), (112, 112), (168, 56), (252, 364))
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny(qwen_tiny_folders):
    return qwen_tiny_folders["before-4.52"]


@pytest.fixture(scope="module")
def hf_model(tiny):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny, torch_dtype=torch.float32).eval()


def _export(tiny, tmp_path_factory, quant, vision_quant):
    from huatuo_lite.convert.onnx.export import export_onnx

    out = tmp_path_factory.mktemp(f"qwen-onnx-{quant}")
    export_onnx(tiny, out, quant=quant, vision_quant=vision_quant)     # the LLaVA entry point routes it
    return out


@pytest.fixture(scope="module")
def onnx_fp32(tiny, tmp_path_factory):
    return _export(tiny, tmp_path_factory, "fp32", "fp32")


@pytest.fixture(scope="module")
def engine(onnx_fp32):
    from huatuo_lite.backends import load_backend

    eng = load_backend("onnx").open_engine(onnx_fp32, threads=1)
    yield eng
    eng.close()


def _image(seed: int, size: tuple) -> np.ndarray:
    height, width = fam.smart_resize(*size)
    return np.random.default_rng(seed).standard_normal((3, height, width)).astype(np.float32)


def _ids(tiny) -> dict:
    config = json.loads((tiny / "config.json").read_text())
    return {k: config[f"{k}_token_id"] for k in ("vision_start", "vision_end", "image")}


def _prompt(engine, tiny, images: list, features: list):
    """(HF input_ids, our segments) for one user turn holding the images, then a question."""
    from huatuo_lite.backends.base import ImageEmbeds

    ids = _ids(tiny)
    head = engine.tokenize(f"{fam.IM_START}system\n{fam.DEFAULT_SYSTEM}{fam.IM_END}\n{fam.IM_START}user\n")
    tail = engine.tokenize(f"What is shown in the scan?{fam.IM_END}\n{fam.IM_START}assistant\n")
    input_ids, segments, text = list(head), [], list(head)
    for pixels, rows in zip(images, features):
        grid = fam.grid_of(pixels)
        input_ids += [ids["vision_start"]] + [ids["image"]] * len(rows) + [ids["vision_end"]]
        segments += [text + [ids["vision_start"]], ImageEmbeds(rows, grid=grid)]
        text = [ids["vision_end"]]
    segments.append(text + tail)
    return input_ids + tail, segments


def _hf_inputs(images: list) -> dict:
    import torch

    patches, grids = zip(*(fam.patchify(p) for p in images))
    return {"pixel_values": torch.from_numpy(np.concatenate(patches)), "image_grid_thw": torch.tensor(grids)}


def test_manifest_records_family_image_generation(onnx_fp32, tiny):
    manifest = json.loads((onnx_fp32 / "manifest.json").read_text())
    pre = json.loads((tiny / "preprocessor_config.json").read_text())
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert manifest["format"] == "onnx" and manifest["family"] == fam.NAME
    assert manifest["image"] == {"min_pixels": pre["min_pixels"], "max_pixels": pre["max_pixels"]}
    assert manifest["generation"]["repetition_penalty"] == gen["repetition_penalty"]
    assert manifest["generation"]["top_k"] == gen["top_k"]
    assert set(manifest["text"]["eos_token_ids"]) >= set(gen["eos_token_id"])
    assert {e["role"] for e in manifest["files"].values()} >= {"vision", "embed", "decoder", "tokenizer"}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_vision_graph_equals_transformers(engine, hf_model, size):
    import torch

    pixels = _image(1, size)
    (features,) = engine.encode_images([pixels])
    rows, cols = fam.grid_of(pixels)
    with torch.no_grad():
        inputs = _hf_inputs([pixels])
        want = hf_model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).numpy()
    assert features.shape == (rows * cols, engine.hidden_size) == want.shape
    assert np.abs(features - want).max() < 1e-4


def test_decoder_logits_equal_transformers_forward(engine, hf_model, tiny):
    import torch

    images = [_image(2, (112, 168)), _image(3, (252, 364))]
    features = engine.encode_images(images)
    input_ids, segments = _prompt(engine, tiny, images, features)
    logits = engine.prefill(segments, all_logits=True)
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor([input_ids]), **_hf_inputs(images)).logits[0].numpy()
    assert logits.shape == want.shape
    assert np.abs(logits - want).max() < 1e-3
    # a step continues at the next 3-D position: the logits of the prompt + one token
    step = engine.step(int(np.argmax(logits[-1])))
    with torch.no_grad():
        longer = torch.tensor([input_ids + [int(np.argmax(logits[-1]))]])
        want_step = hf_model(input_ids=longer, **_hf_inputs(images)).logits[0, -1].numpy()
    assert np.abs(step - want_step).max() < 1e-3


def _greedy(engine, segments, prompt_ids, penalty: float) -> list:
    from huatuo_lite.sampler import Sampler

    config = fam.GENERATION_DEFAULTS.with_overrides(temperature=0.0, repetition_penalty=penalty)
    sampler = Sampler(config, prompt_ids)
    logits, tokens = engine.prefill(segments), []
    for _ in range(NEW_TOKENS):
        token = sampler(logits)
        if token in engine.eos_token_ids:
            break
        tokens.append(token)
        logits = engine.step(token)
    return tokens


def _hf_greedy(hf_model, input_ids, images, penalty: float, eos: list) -> list:
    import torch

    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor([input_ids]), **_hf_inputs(images), do_sample=False,
                                repetition_penalty=penalty, max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                                top_k=None, top_p=None, temperature=None)
    tokens = out[0, len(input_ids):].tolist()
    return tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]    # up to EOS


@pytest.mark.parametrize("penalty", [None, 2.0], ids=["checkpoint-penalty", "penalty-2"])
def test_greedy_answers_equal_transformers_generate(engine, hf_model, tiny, penalty):
    """None: the checkpoint's 1.05 (too weak to change this tiny's answer); 2.0 changes it."""
    images = [_image(4, (168, 56)), _image(5, (252, 364))]    # two sizes, two aspects
    features = engine.encode_images(images)
    assert [len(f) for f in features] == [fam.image_tokens(p) for p in images]
    input_ids, segments = _prompt(engine, tiny, images, features)
    strong = penalty is not None
    penalty = penalty or engine.generation_defaults.repetition_penalty    # the tiny's generation_config
    ours = _greedy(engine, segments, input_ids, penalty)
    want = _hf_greedy(hf_model, input_ids, images, penalty, sorted(engine.eos_token_ids))
    assert len(want) > 0 and ours == want
    if strong:
        assert ours != _greedy(engine, segments, input_ids, 1.0)     # the penalty is in play


def test_both_layouts_give_the_same_graphs(onnx_fp32, qwen_tiny_folders, tmp_path_factory):
    newer = _export(qwen_tiny_folders["from-4.52"], tmp_path_factory, "fp32", "fp32")
    graphs = ("vision.onnx", "embed.onnx", "decoder.onnx")
    digests = [{g: json.loads((f / "manifest.json").read_text())["files"][g]["sha256"] for g in graphs}
               for f in (onnx_fp32, newer)]
    assert digests[0] == digests[1]


def test_ask_equals_the_torch_reference(onnx_fp32, tiny, tmp_path):
    """The whole runtime path (image file -> smart_resize -> prompt -> generate loop) answers
    as the torch reference engine (transformers' model) for two images of other sizes."""
    from PIL import Image

    from huatuo_lite import api

    rng = np.random.default_rng(7)
    paths = []
    for i, (width, height) in enumerate(((200, 90), (64, 300))):
        paths.append(tmp_path / f"scan{i}.png")
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(paths[-1])
    answers = []
    for folder, backend in ((onnx_fp32, "onnx"), (tiny, "torch")):
        model = api.load(str(folder), backend=backend, threads=1)
        try:
            answers.append(model.ask([str(p) for p in paths], "What is shown?", temperature=0, max_new_tokens=10))
        finally:
            model.close()
    assert answers[0].prompt_tokens == answers[1].prompt_tokens
    assert answers[0].token_ids == answers[1].token_ids and answers[0].completion_tokens > 0


def test_int8_loads_and_answers(tiny, tmp_path_factory, engine, hf_model):
    from huatuo_lite.backends import load_backend

    folder = _export(tiny, tmp_path_factory, "int8", "int8")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["onnx"]["quant"] == "int8" and manifest["onnx"]["vision_quant"] == "int8"
    int8 = load_backend("onnx").open_engine(folder, threads=1)
    try:
        images = [_image(6, (112, 112))]
        features = int8.encode_images(images)
        reference = engine.encode_images(images)
        # weight-only int8: close to fp32 but not the same bytes
        assert 0 < np.abs(features[0] - reference[0]).max() < 0.05 * np.abs(reference[0]).max()
        input_ids, segments = _prompt(int8, tiny, images, features)
        tokens = _greedy(int8, segments, input_ids, int8.generation_defaults.repetition_penalty)
        assert tokens and all(0 <= t < int8.vocab_rows for t in tokens)
    finally:
        int8.close()


def test_missing_graph_is_one_sentence(onnx_fp32, tmp_path):
    from huatuo_lite.backends import load_backend
    from huatuo_lite.errors import ModelFormatError

    broken = tmp_path / "broken"
    shutil.copytree(onnx_fp32, broken)
    (broken / "vision.onnx").unlink()
    with pytest.raises(ModelFormatError) as err:
        load_backend("onnx").open_engine(broken, threads=1)
    message = str(err.value)
    assert "vision.onnx" in message and "\n" not in message


def test_wrong_family_is_one_sentence(onnx_fp32):
    from huatuo_lite.backends.onnx_qwen25vl import OnnxQwen25vlEngine
    from huatuo_lite.errors import ModelFormatError

    manifest = json.loads((onnx_fp32 / "manifest.json").read_text())
    manifest.pop("family")
    folder = onnx_fp32.parent / "as-llava"
    shutil.copytree(onnx_fp32, folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="not an ONNX Qwen2.5-VL one") as err:
        OnnxQwen25vlEngine(folder, threads=1)
    assert "\n" not in str(err.value)


def test_image_without_grid_is_one_sentence(engine):
    from huatuo_lite.backends.base import ImageEmbeds
    from huatuo_lite.errors import PromptError

    features = np.zeros((6, engine.hidden_size), np.float32)
    with pytest.raises(PromptError, match="grid"):
        engine.prefill([[1, 2], ImageEmbeds(features), [3]])
    with pytest.raises(PromptError, match="multiples of 28"):
        engine.encode_images([np.zeros((3, 30, 56), np.float32)])


def test_unknown_family_is_one_sentence(onnx_fp32):
    from huatuo_lite.backends import load_backend
    from huatuo_lite.errors import ModelFormatError

    manifest = json.loads((onnx_fp32 / "manifest.json").read_text())
    folder = onnx_fp32.parent / "future-family"
    shutil.copytree(onnx_fp32, folder)
    (folder / "manifest.json").write_text(json.dumps({**manifest, "family": "qwen3vl"}))
    with pytest.raises(ModelFormatError, match="qwen3vl") as err:
        load_backend("onnx").open_engine(folder, threads=1)
    assert "\n" not in str(err.value)
