"""#16.7: a Yi/Llama-style checkpoint whose tokenizer.model has add_dummy_prefix false
and that ships no tokenizer.json. transformers (the torch reference, and the
tokenizer.json the ONNX export writes) converts it with a "▁" before each text;
the GGUF must tell llama.cpp the same (tokenizer.ggml.add_space_prefix), or every
prompt chunk loses a token and the answer differs."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from support.engines import open_gguf, skip_without
skip_without('torch', 'gguf', 'llama_cpp')

from huatuo_lite.backends import load_backend
from huatuo_lite.backends.gguf_llama import read_gguf_metadata
from huatuo_lite.families.llava import GenerationConfig
from huatuo_lite.generate import run
from huatuo_lite.prompt import Turn, prompt_token_layout

TEXTS = ("<|user|>\n", "\nWhat abnormality is seen in this chest X-ray?\n<|assistant|>\n",
         " leading space", "two  spaces and <|endoftext|> in text", "这张胸部X光片显示了什么异常？")


@pytest.fixture(scope="module")
def slow_only_34b(tiny_34b, tmp_path_factory):
    """tiny_34b as such checkpoints ship: tokenizer.model + a config without add_prefix_space."""
    folder = tmp_path_factory.mktemp("slow-only-34b") / "model"
    shutil.copytree(tiny_34b, folder)
    (folder / "tokenizer.json").unlink()
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("add_prefix_space")
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def engines(slow_only_34b, tmp_path_factory):
    from huatuo_lite.convert.gguf.export import export_gguf

    out = tmp_path_factory.mktemp("slow-only-34b-gguf")
    export_gguf(slow_only_34b, out, quant="F32", threads=1, vision_onnx=False)
    gguf, ref = open_gguf(out), load_backend("torch").open_engine(slow_only_34b, threads=1)
    yield gguf, ref
    gguf.close()
    ref.close()


def test_the_checkpoint_is_the_case_in_question(slow_only_34b):
    from sentencepiece import sentencepiece_model_pb2
    from transformers import AutoTokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((slow_only_34b / "tokenizer.model").read_bytes())
    assert proto.normalizer_spec.add_dummy_prefix is False
    tokenizer = AutoTokenizer.from_pretrained(str(slow_only_34b))
    assert tokenizer.convert_ids_to_tokens(tokenizer("hello", add_special_tokens=False).input_ids)[0][0] == "\u2581"


def test_converter_reads_the_prefix_from_transformers(tiny_34b, slow_only_34b):
    from huatuo_lite.convert.gguf.text import transformers_adds_space_prefix

    assert transformers_adds_space_prefix(tiny_34b) is False        # its config says add_prefix_space false
    assert transformers_adds_space_prefix(slow_only_34b) is True


def test_gguf_records_the_prefix(engines):
    gguf, _ = engines
    assert read_gguf_metadata(gguf.text_path).get("tokenizer.ggml.add_space_prefix") is True


def test_prompt_tokens_match_transformers(engines, slow_only_34b):
    from transformers import AutoTokenizer

    gguf, ref = engines
    hf = AutoTokenizer.from_pretrained(str(slow_only_34b))
    for text in TEXTS:
        want = hf(text, add_special_tokens=False).input_ids
        assert gguf.tokenize(text) == ref.tokenize(text) == want, text
    turns = [Turn(question="What abnormality is seen in this chest X-ray?", n_images=1)]
    assert prompt_token_layout(turns, gguf.tokenize) == prompt_token_layout(turns, ref.tokenize)


def test_greedy_answers_match(engines):
    gguf, ref = engines
    config = GenerationConfig(temperature=0, repetition_penalty=1.0, max_new_tokens=12)
    answers = []
    for engine in (gguf, ref):
        generation = run(engine, [], "Describe the chest radiograph.", config=config)
        for _ in generation:
            pass
        answers.append(generation.answer)
    assert answers[0].prompt_tokens == answers[1].prompt_tokens
    assert answers[0].token_ids == answers[1].token_ids
    assert np.isfinite(answers[0].timings["prefill_s"])
