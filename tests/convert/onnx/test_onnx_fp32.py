"""fp32 ONNX graphs against the torch reference (transformers' Llava) on the tiny
7B (Qwen2, byte-level BPE) and 34B (Yi/llama, SentencePiece, external-data
layout) checkpoints: same image features, same logits within 1e-4 relative for
prompts with one and two images, identical 32-token greedy continuations."""
from __future__ import annotations

import numpy as np
import pytest

from support.engines import open_onnx, prompt_segments, skip_without
skip_without('torch', 'onnx', 'onnxruntime')


REL_TOL = 1e-4
VARIANTS = [("onnx_7b", "ref_7b"), ("onnx_34b", "ref_34b")]


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def greedy(engine, segments, n):
    logits, tokens = engine.prefill(segments), []
    for _ in range(n):
        tokens.append(int(np.argmax(logits)))
        logits = engine.step(tokens[-1])
    return tokens, logits


@pytest.mark.parametrize("onnx_fixture,ref_fixture", VARIANTS)
def test_image_features_match_reference(onnx_fixture, ref_fixture, pixels, request):
    onnx_engine, ref = open_onnx(request.getfixturevalue(onnx_fixture)), request.getfixturevalue(ref_fixture)
    got, want = onnx_engine.encode_images(pixels), ref.encode_images(pixels)
    assert got.shape == want.shape == (2, 576, ref.hidden_size)
    err = rel_err(got, want)
    print(f"{onnx_fixture} vision rel err {err:.2e}")
    assert err < REL_TOL


@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("onnx_fixture,ref_fixture", VARIANTS)
def test_prompt_logits_match_reference(onnx_fixture, ref_fixture, n_images, pixels, request):
    onnx_engine, ref = open_onnx(request.getfixturevalue(onnx_fixture)), request.getfixturevalue(ref_fixture)
    features = ref.encode_images(pixels[:n_images])
    segments = prompt_segments(ref, features)
    text_runs = [s for s in segments if isinstance(s, list)]
    assert [s for s in prompt_segments(onnx_engine, features) if isinstance(s, list)] == text_runs
    got, want = onnx_engine.prefill(segments, all_logits=True), ref.prefill(segments, all_logits=True)
    assert got.shape == want.shape == (576 * n_images + sum(map(len, text_runs)), ref.checkpoint.text.vocab_size)
    err = rel_err(got, want)
    print(f"{onnx_fixture} {n_images} image(s): prefill logits rel err {err:.2e}")
    assert err < REL_TOL
    last = onnx_engine.prefill(segments)
    assert last.shape == (ref.checkpoint.text.vocab_size,)
    np.testing.assert_array_equal(last, got[-1])


@pytest.mark.parametrize("onnx_fixture,ref_fixture", VARIANTS)
def test_greedy_continuation_identical(onnx_fixture, ref_fixture, pixels, request):
    onnx_engine, ref = open_onnx(request.getfixturevalue(onnx_fixture)), request.getfixturevalue(ref_fixture)
    segments = prompt_segments(ref, ref.encode_images(pixels[:1]))
    got, got_last = greedy(onnx_engine, segments, 32)
    want, want_last = greedy(ref, segments, 32)
    print(f"{onnx_fixture} greedy: {got[:12]}..., last-step rel err {rel_err(got_last, want_last):.2e}")
    assert got == want
    assert rel_err(got_last, want_last) < REL_TOL


@pytest.mark.parametrize("onnx_fixture,ref_fixture", VARIANTS)
def test_tokenizer_and_metadata_match_reference(onnx_fixture, ref_fixture, request):
    onnx_engine, ref = open_onnx(request.getfixturevalue(onnx_fixture)), request.getfixturevalue(ref_fixture)
    for text in ("<|user|>\n<image>\n这张胸部X光片显示了什么异常？\n<|assistant|>\n", " a  b\t\nc <|endoftext|>"):
        assert onnx_engine.tokenize(text) == ref.tokenize(text)
    rows = ref.checkpoint.text.vocab_size
    mismatched = [i for i in range(rows + 2) if onnx_engine.token_bytes(i) != ref.token_bytes(i)]
    assert mismatched == []
    assert onnx_engine.eos_token_ids == ref.eos_token_ids
    assert (onnx_engine.n_ctx, onnx_engine.hidden_size) == (ref.n_ctx, ref.hidden_size)
    assert onnx_engine.name == "onnx"


def test_decoder_graph_left_padded_batch(onnx_7b, ref_7b):
    """decoder.onnx on a batch of two, the first left-padded by 3, prefill then one
    cached step, against transformers' language model with the same mask."""
    import torch
    from huatuo_lite.backends.vision_onnx import make_session

    embed, decoder = make_session(onnx_7b / "embed.onnx", 1), make_session(onnx_7b / "decoder.onnx", 1)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[0, :3] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    (embeds,) = embed.run(None, {"input_ids": ids})
    past_names = [i.name for i in decoder.get_inputs() if i.name.startswith("past_key_values.")]
    kv = decoder.get_inputs()[3].shape
    empty = {n: np.zeros((2, kv[1], 0, kv[3]), np.float32) for n in past_names}
    first = decoder.run(None, {"inputs_embeds": embeds[:, :8], "attention_mask": mask[:, :8],
                               "position_ids": positions[:, :8], **empty})
    past = dict(zip(past_names, first[1:]))
    second = decoder.run(None, {"inputs_embeds": embeds[:, 8:], "attention_mask": mask,
                                "position_ids": positions[:, 8:], **past})
    got = np.concatenate([first[0], second[0]], axis=1)
    with torch.no_grad():
        out = ref_7b.model.model.language_model(inputs_embeds=torch.from_numpy(embeds),
                                                attention_mask=torch.from_numpy(mask),
                                                position_ids=torch.from_numpy(positions))
        want = ref_7b.model.lm_head(out.last_hidden_state).numpy()
    valid = mask.astype(bool)                     # padded rows are meaningless in both
    err = rel_err(got[valid], want[valid])
    print(f"left-padded batch of 2: rel err {err:.2e}")
    assert err < REL_TOL
