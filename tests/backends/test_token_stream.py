"""Streamed text: the generation loop's pieces join to the full decode, also where a
Chinese character or an emoji is split across tokens, for the ONNX tokenizer
(tokenizer.json, both vocabulary kinds) and llama.cpp's token_to_piece bytes; and
any token sequence streams without error to the bytes' replacement-decoding (the
case where tokenizers' DecodeStream raises or drops text, see token_pieces.py)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from huatuo_lite.backends.onnx import TOKENIZER_FILE, TokenizerFile
from huatuo_lite.families.llava import GenerationConfig
from huatuo_lite.generate import run
from support.engines import open_gguf, skip_without

TEXTS = ("肺部CT显示磨玻璃影，建议随访。", "Chest film 🫁 normal 👩\u200d⚕️, 无异常 😀", "aéü 中文🙂🙂 end")
GREEDY = dict(temperature=0.0, repetition_penalty=1.0, top_k=0, top_p=1.0)


class ScriptedEngine:
    """An engine whose logits make the greedy sampler emit `script`, then an extra eos
    row; tokenize/token_bytes are a real backend's (only the text path is exercised)."""

    def __init__(self, tokenize, token_bytes, vocab: int, script):
        self.tokenize, self.token_bytes = tokenize, token_bytes
        self.eos = vocab                          # one row past the vocabulary
        self.eos_token_ids = frozenset({self.eos})
        self.n_ctx, self.script = 4096, list(script)

    def _logits(self) -> np.ndarray:              # [V + 1], one-hot on the next scripted token
        logits = np.zeros(self.eos + 1, np.float32)
        logits[self.script.pop(0) if self.script else self.eos] = 100.0
        return logits

    def prefill(self, segments, all_logits=False):
        return self._logits()

    def step(self, token_id):
        return self._logits()


def stream(tokenize, token_bytes, vocab, ids) -> tuple[list, str]:
    """The pieces the loop yields for `ids`, and the answer's text."""
    engine = ScriptedEngine(tokenize, token_bytes, vocab, ids)
    generation = run(engine, [], "q", config=GenerationConfig(**GREEDY, max_new_tokens=len(ids) + 1))
    pieces = list(generation)
    assert generation.answer.token_ids == list(ids) and generation.answer.finish_reason == "stop"
    return pieces, generation.answer.text


def split_characters(token_bytes, ids) -> int:
    """How many tokens are not whole UTF-8 on their own (a character cut across tokens)."""
    def whole(data):
        try:
            data.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False
    return sum(not whole(token_bytes(i)) for i in ids)


# ------------------------------------------------------------------- ONNX ----
@pytest.fixture(scope="module", params=["tiny_7b", "tiny_34b"])   # byte-level BPE, SentencePiece
def tokenizer(request):
    return TokenizerFile(request.getfixturevalue(request.param) / TOKENIZER_FILE)


@pytest.mark.parametrize("text", TEXTS)
def test_onnx_stream_equals_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert split_characters(tokenizer.token_bytes, ids) > 0       # the test needs a split character
    vocab = tokenizer.tokenizer.get_vocab_size()
    pieces, answer = stream(tokenizer.encode, tokenizer.token_bytes, vocab, ids)
    assert "".join(pieces) == tokenizer.tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(pieces) > 1 and not any("\ufffd" in p for p in pieces)   # streamed, never half a character
    assert answer == text.strip()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_token_sequence_streams_its_bytes(tokenizer, data):
    vocab = tokenizer.tokenizer.get_vocab_size()
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12))
    pieces, _ = stream(tokenizer.encode, tokenizer.token_bytes, vocab, ids)
    # invalid or unfinished UTF-8 (a lone continuation byte, a cut emoji at the end) comes out
    # as U+FFFD where it stands, and nothing after it is lost or reordered
    assert "".join(pieces) == b"".join(tokenizer.token_bytes(i) for i in ids).decode("utf-8", "replace")


# ------------------------------------------------------------------- GGUF ----
@pytest.mark.parametrize("folder", ["gguf_7b_f32", "gguf_34b_f32"])
def test_gguf_stream_equals_the_text(request, folder):
    skip_without("torch", "gguf", "llama_cpp")
    engine = open_gguf(request.getfixturevalue(folder))
    try:
        for text in TEXTS:
            ids = engine.tokenize(text)
            assert split_characters(engine.token_bytes, ids) > 0
            pieces, answer = stream(engine.tokenize, engine.token_bytes, engine.n_vocab, ids)
            assert "".join(pieces).strip() == text.strip() == answer
            assert len(pieces) > 1 and not any("\ufffd" in p for p in pieces)
    finally:
        engine.close()
