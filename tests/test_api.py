"""The Python API: ask/stream/chat/create_chat_completion, thread safety, offline."""
from __future__ import annotations

import base64
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import huatuo_lite.api as api
from huatuo_lite.errors import ImageError, PromptError

EXAMPLE = Path(__file__).resolve().parents[1] / "models" / "examples" / "chest_xray.png"
GREEDY = dict(temperature=0, max_new_tokens=6)


@pytest.fixture(scope="module")
def model(tiny_7b):
    with api.load(tiny_7b, backend="torch") as hv:
        yield hv


def test_image_sources_are_equivalent(model):
    pil = Image.open(EXAMPLE)
    answers = {kind: model.ask(src, "What is shown?", **GREEDY).token_ids
               for kind, src in {"path": str(EXAMPLE), "bytes": EXAMPLE.read_bytes(), "pil": pil,
                                 "array": np.asarray(pil.convert("RGB"))}.items()}
    assert len({tuple(v) for v in answers.values()}) == 1, answers


def test_stream_concatenates_to_the_answer(model):
    pieces = list(model.stream(EXAMPLE, "Describe it.", **GREEDY))
    answer = model.ask(EXAMPLE, "Describe it.", **GREEDY)
    assert "".join(pieces).strip() == answer.text
    assert answer.completion_tokens <= 6 and answer.finish_reason in ("stop", "length")


def test_threads_share_one_model(model):
    questions = [f"Question number {i}?" for i in range(8)]
    sequential = [model.ask(EXAMPLE, q, **GREEDY).token_ids for q in questions]
    results = [None] * 8

    def worker(i):
        results[i] = model.ask(EXAMPLE, questions[i], **GREEDY).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == sequential


def test_chat_keeps_history_in_upstream_format(model):
    session = model.chat()
    first = session.ask("What is shown?", images=[EXAMPLE], **GREEDY)
    second = session.ask("Is it normal?", **GREEDY)
    assert len(session.turns) == 2 and session.turns[0].answer == first.text
    assert second.prompt_tokens > first.prompt_tokens + first.completion_tokens
    session.reset()
    assert session.turns == [] and session.images == []


def test_chat_refuses_a_seventh_image(model):
    session = model.chat()
    for _ in range(6):
        session.add_image(EXAMPLE)
    with pytest.raises(PromptError, match="6"):
        session.add_image(EXAMPLE)


def test_create_chat_completion_matches_ask(model):
    uri = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
    messages = [{"role": "system", "content": "ignored"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": "What is shown?"}]}]
    result = model.create_chat_completion(messages, temperature=0, max_tokens=6)
    assert result["object"] == "chat.completion"
    assert result["choices"][0]["message"]["content"] == model.ask(EXAMPLE, "What is shown?", **GREEDY).text
    chunks = list(model.create_chat_completion(messages, stream=True, temperature=0, max_tokens=6))
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed.strip() == result["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == result["choices"][0]["finish_reason"]


def test_file_url_and_refused_http(model):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": EXAMPLE.as_uri()}},
                                             {"type": "text", "text": "What?"}]}]
    assert model.create_chat_completion(messages, temperature=0, max_tokens=2)["usage"]["prompt_tokens"] > 576
    messages[0]["content"][0]["image_url"]["url"] = "https://example.org/x.png"
    with pytest.raises(ImageError, match="offline"):
        model.create_chat_completion(messages)


def test_ask_makes_no_network_call(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert model.ask(EXAMPLE, "Offline?", **GREEDY).completion_tokens > 0


def test_load_in_a_guarded_process_is_offline(tiny_7b, monkeypatch):
    """Loading (tokenizer, config) must not reach for the hub either."""
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
    with api.load(tiny_7b, backend="torch") as hv:
        assert hv.ask(EXAMPLE, "Q?", **GREEDY).completion_tokens > 0


# ------------------------------------------------------------------ #16/#17
def test_package_exports_load_lazily():
    import subprocess
    import sys

    code = ("import sys, huatuo_lite; assert 'huatuo_lite.api' not in sys.modules and 'numpy' not in sys.modules; "
            "assert huatuo_lite.load is huatuo_lite.api.load; from huatuo_lite import Answer, HuatuoError; "
            "print(sorted(set(huatuo_lite.LAZY_EXPORTS) - set(dir(huatuo_lite))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_closed_model_says_so(tiny_7b):
    from huatuo_lite.errors import HuatuoError

    hv = api.load(tiny_7b, backend="torch")
    hv.close()
    for call in (lambda: hv.ask(EXAMPLE, "What?"), lambda: list(hv.stream(EXAMPLE, "What?")),
                 lambda: hv.generation([], "What?")):
        with pytest.raises(HuatuoError, match=r"^This model was closed; load it again with huatuo_lite\.load"):
            call()


@pytest.mark.parametrize("options", [dict(temperature=float("nan")), dict(temperature=1e-310), dict(seed=-1),
                                     dict(top_p=float("inf")), dict(repetition_penalty=float("nan"))])
def test_bad_generation_options_raise_before_generating(model, options):
    from huatuo_lite.errors import HuatuoError

    name = next(iter(options))
    with pytest.raises(HuatuoError, match=f"^{name} = "):
        model.ask(EXAMPLE, "What?", **options)


def test_load_without_a_model_uses_the_default(monkeypatch, tmp_path):
    from huatuo_lite import store
    from huatuo_lite.errors import HuatuoError

    monkeypatch.setenv("HUATUO_LITE_HOME", str(tmp_path))
    monkeypatch.delenv("HUATUO_LITE_MODEL", raising=False)
    monkeypatch.setattr(store, "demo_model", lambda: None)      # an install without the demo model
    with pytest.raises(HuatuoError, match="^No model given"):
        api.load()


def test_answer_dict_has_usage_and_llama_timings(model):
    data = model.ask(EXAMPLE, "What?", **GREEDY).to_dict()
    assert data["usage"] == {"prompt_tokens": data["prompt_tokens"], "completion_tokens": data["completion_tokens"],
                             "total_tokens": data["prompt_tokens"] + data["completion_tokens"]}
    timings = data["timings"]
    assert timings["prompt_n"] == data["prompt_tokens"] and timings["predicted_n"] == data["completion_tokens"]
    assert timings["prompt_ms"] == pytest.approx(timings["prefill_s"] * 1000)
    assert timings["predicted_ms"] == pytest.approx(timings["decode_s"] * 1000)
    assert timings["prompt_per_second"] == timings["prefill_tokens_per_s"]
    assert timings["predicted_per_second"] == timings["decode_tokens_per_s"]
