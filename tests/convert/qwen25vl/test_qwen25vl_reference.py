"""The torch reference engine for Qwen2.5-VL answers like transformers' own generate(), token
for token, with the checkpoint's repetition penalty (which, as HF generate is called with
input_ids, also sees the prompt, <|image_pad|> ids at the image positions), for images of
several sizes and aspect ratios (their token count follows smart_resize), in both layouts."""
from __future__ import annotations

import numpy as np
import pytest
from qwen_helpers import LAYOUTS, generation_config, noise_image, qwen_pixels, user_message

from huatuo_lite.backends.base import ImageEmbeds
from huatuo_lite.errors import ImageError, PromptError
from huatuo_lite.families import qwen25vl as fam
from huatuo_lite.prompt import Turn

MAX_NEW = 12
# (width, height): square, wide, and tall with sides that need resizing
IMAGES = ((336, 336), (448, 224), (200, 300))
CASES = {f"{w}x{h}": ([(w, h)], q) for (w, h), q in zip(IMAGES, ("What is shown?", "Describe the lesion.",
                                                               "Is there a fracture?"))}
CASES["three images"] = (list(IMAGES), "Compare the three scans.")


def _segments(engine, text: str, features: list, pixels: list) -> tuple[list, list]:
    """Our prompt segments for rendered text whose images are one <|image_pad|> each, and the
    ids HF's processor makes of it (each pad repeated once per feature)."""
    parts = text.split(fam.IMAGE_PAD)
    segments, ids = [], []
    for i, part in enumerate(parts):
        tokens = engine.tokenize(part)
        segments.append(tokens)
        ids += tokens
        if i < len(features):
            segments.append(ImageEmbeds(features[i], grid=fam.grid_of(pixels[i])))
            ids += [engine.image_token_id] * len(features[i])
    return segments, ids


def _greedy(engine, segments: list, prompt_ids: list, penalty: float) -> list:
    """Greedy decoding with HF's repetition penalty over prompt + generated ids."""
    logits, out = engine.prefill(segments), []
    for _ in range(MAX_NEW):
        seen = np.unique(np.asarray(prompt_ids + out, dtype=np.int64))
        scores = logits.copy()
        scores[seen] = np.where(scores[seen] < 0, scores[seen] * penalty, scores[seen] / penalty)
        token = int(np.argmax(scores))
        out.append(token)
        if token in engine.eos_token_ids:
            break
        logits = engine.step(token)
    return out


def _hf_answer(engine, processor, images: list, question: str, penalty: float) -> tuple[list, dict]:
    """transformers' greedy answer (new ids) and the processor's inputs."""
    import torch

    text = processor.apply_chat_template([user_message(len(images), question)], add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    with torch.inference_mode():
        generated = engine.model.generate(**inputs, do_sample=False, repetition_penalty=penalty,
                                          max_new_tokens=MAX_NEW)
    return generated[0, inputs["input_ids"].shape[1]:].tolist(), inputs


def _our_answer(engine, images: list, question: str, penalty: float, inputs: dict) -> list:
    pixels = [qwen_pixels(image, *engine.image_pixels) for image in images]
    features = engine.encode_images(pixels)
    assert [len(f) for f in features] == [int(t * h * w) // 4 for t, h, w in inputs["image_grid_thw"].tolist()]
    segments, ids = _segments(engine, fam.render([Turn(question, len(images))]), features, pixels)
    assert ids == inputs["input_ids"][0].tolist()
    return _greedy(engine, segments, ids, penalty)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_answer_equals_transformers_generate(case, layout, qwen_engines, qwen_processors, qwen_tiny_folders):
    engine, processor = qwen_engines[layout], qwen_processors[layout]
    sizes, question = CASES[case]
    images = [noise_image(w, h, seed=w + 7 * h) for w, h in sizes]
    penalty = generation_config(qwen_tiny_folders[layout])["repetition_penalty"]
    assert penalty != 1.0
    want, inputs = _hf_answer(engine, processor, images, question, penalty)
    assert _our_answer(engine, images, question, penalty, inputs) == want
    assert len(set(want)) > 3          # the tiny model's answers are not constant


def test_penalty_sees_the_prompt(qwen_engines, qwen_processors, qwen_tiny_folders):
    """A question that holds the answer's own words: penalising the prompt's ids changes the
    answer here (checked), and ours still equals transformers'."""
    engine, processor = qwen_engines["before-4.52"], qwen_processors["before-4.52"]
    penalty = generation_config(qwen_tiny_folders["before-4.52"])["repetition_penalty"]
    images = [noise_image(336, 336, seed=336 + 7 * 336)]
    first, _ = _hf_answer(engine, processor, images, "What is shown?", penalty)
    question = "What is shown? " + engine.tokenizer.decode(first, skip_special_tokens=True)
    want, inputs = _hf_answer(engine, processor, images, question, penalty)
    assert _our_answer(engine, images, question, penalty, inputs) == want
    pixels = [qwen_pixels(image, *engine.image_pixels) for image in images]
    segments, _ = _segments(engine, fam.render([Turn(question, 1)]), engine.encode_images(pixels), pixels)
    assert _greedy(engine, segments, [], penalty) != want      # the generated ids alone: another answer


def test_encode_images_equals_the_models_image_features(qwen_engines, qwen_processors):
    import torch

    engine, processor = qwen_engines["from-4.52"], qwen_processors["from-4.52"]
    images = [noise_image(w, h, seed=3) for w, h in IMAGES]
    inputs = processor.image_processor(images=images, return_tensors="pt")
    with torch.inference_mode():
        want = engine.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    got = engine.encode_images([qwen_pixels(image, *engine.image_pixels) for image in images])
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5)


def test_answers_differ_between_images(qwen_engines):
    """The image reaches the answer: two images of the same size give different logits."""
    engine = qwen_engines["before-4.52"]
    pixels = [qwen_pixels(noise_image(336, 336, seed=s), *engine.image_pixels) for s in (1, 2)]
    features = engine.encode_images(pixels)
    text = fam.render([Turn("What is shown?", 1)])
    logits = [engine.prefill(_segments(engine, text, [f], [p])[0]) for f, p in zip(features, pixels)]
    assert not np.allclose(logits[0], logits[1])


def test_engine_facts(qwen_engines, qwen_tiny_folders):
    from huatuo_lite.convert.qwen25vl.reference import QwenTorchEngine

    engine = qwen_engines["before-4.52"]
    assert isinstance(engine, QwenTorchEngine) and engine.family == fam.NAME and engine.name == "torch"
    assert engine.image_pixels == (3136, 12845056)
    assert engine.eos_token_ids == set(generation_config(qwen_tiny_folders["before-4.52"])["eos_token_id"])
    assert engine.tokenize("<|im_start|>user")[0] == engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
    text = "chest X-ray 胸部"
    assert b"".join(engine.token_bytes(t) for t in engine.tokenize(text)) == text.encode("utf-8")
    logits = engine.prefill([engine.tokenize("Hello")], all_logits=True)
    assert logits.shape == (len(engine.tokenize("Hello")), engine.vocab_rows)


def test_engine_bad_inputs_are_one_sentence(qwen_engines):
    engine = qwen_engines["before-4.52"]
    with pytest.raises(ImageError, match="multiples of 28"):
        engine.encode_images([np.zeros((3, 30, 28), np.float32)])
    feature = np.zeros((4, engine.hidden_size), np.float32)
    with pytest.raises(PromptError, match="needs its grid"):
        engine.prefill([[1, 2], ImageEmbeds(feature)])
    with pytest.raises(PromptError, match=rf"must be \[6, {engine.hidden_size}\]"):
        engine.prefill([[1, 2], ImageEmbeds(feature, grid=(2, 3))])
    with pytest.raises(PromptError, match="empty"):
        engine.prefill([[]])
