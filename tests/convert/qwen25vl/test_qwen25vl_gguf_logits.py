"""The F32 text GGUF (llama.cpp's qwen2vl) computes transformers' logits on a text-only prompt.

Text tokens take the same position in all three M-RoPE streams, so llama.cpp's token batch with
1-D positions (it copies a token's position to every stream) must give the logits of
Qwen2_5_VLForConditionalGeneration itself (whose get_rope_index gives 0..L-1 thrice)."""
from __future__ import annotations

import numpy as np
import pytest

from support.engines import skip_without

skip_without("torch", "transformers", "gguf", "llama_cpp")

PROMPT_TURN = "What abnormality is seen in this chest X-ray? 这张胸部X光片显示了什么异常？"
# relative to the largest reference logit, as tests/backends/test_gguf_backend.py bounds the LLaVA
# family's F32 prefill; measured 2.7e-4 (max |diff| 1.5e-3 at logit scale 5.5; 2.1e-4 already at
# position 0, where RoPE is the identity, so it is not the positions; transformers f32 vs f64: 9e-6)
MAX_REL_DIFF = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from huatuo_lite.convert.qwen25vl.tiny import make_tiny_qwen25vl

    return make_tiny_qwen25vl(tmp_path_factory.mktemp("qwen-tiny-logits") / "tiny", layout="from-4.52")


@pytest.fixture(scope="module")
def f32_text(tiny, tmp_path_factory):
    from huatuo_lite.convert.qwen25vl.gguf import export_qwen25vl_gguf

    return export_qwen25vl_gguf(tiny, tmp_path_factory.mktemp("qwen-gguf-f32"), quant="F32", self_test=False,
                                threads=1)


def _prompt_ids(tiny) -> list[int]:
    from transformers import AutoTokenizer

    from huatuo_lite.families import qwen25vl
    from huatuo_lite.prompt import Turn

    text = qwen25vl.render([Turn(PROMPT_TURN, 0, None)])
    return AutoTokenizer.from_pretrained(str(tiny)).encode(text), text


def _transformers_logits(tiny, ids) -> np.ndarray:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny), dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def _llama_logits(path, ids) -> tuple[np.ndarray, list[int]]:
    """Every position's logits from one token batch (positions 0..L-1, one stream), and
    llama.cpp's own tokenization of the same text for comparison."""
    import llama_cpp

    from huatuo_lite.backends.gguf_llama import load_model, new_context, quiet_llama

    quiet_llama()
    model = load_model(path)
    ctx = new_context(model, 256, 1, 256, exact=True)
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(ids)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        rows = [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
                for i in range(len(ids))]
        return np.stack(rows), model
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def _llama_tokenize(model, text: str) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(model)
    data = text.encode("utf-8")
    out = (llama_cpp.llama_token * (len(data) + 8))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), out, len(out), False, True)
    return list(out[:n])


def test_f32_text_logits_equal_transformers(tiny, f32_text):
    import llama_cpp

    ids, text = _prompt_ids(tiny)
    reference = _transformers_logits(tiny, ids)
    logits, model = _llama_logits(f32_text, ids)
    try:
        assert _llama_tokenize(model, text) == ids      # the vocabulary, merges and qwen2 pre-tokenizer
    finally:
        llama_cpp.llama_model_free(model)
    assert logits.shape == reference.shape
    diff, scale = float(np.abs(logits - reference).max()), float(np.abs(reference).max())
    print(f"\n{len(ids)} tokens: max |llama.cpp - transformers| logit = {diff:.2e} at logit scale {scale:.2f} "
          f"(relative {diff / scale:.1e})")
    assert diff / scale < MAX_REL_DIFF
    assert (logits.argmax(-1) == reference.argmax(-1)).all()
