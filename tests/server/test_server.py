"""The OpenAI-compatible server, called by the official openai client over loopback:
answers, streams, concurrency, keys, --allow-dir, protocol errors (servers in conftest.py)."""
from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from huatuo_lite.server.policy import ServerSettings  # noqa: E402
from huatuo_lite.server.run import background_server  # noqa: E402
from support.server_http import DATA_URI, EXAMPLE, GREEDY, KEY, noise_png, raw, user  # noqa: E402


# ------------------------------------------------------------- answers ----
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-7b"]
    assert raw(server + "/health") == (200, {"status": "ok", "model": "tiny-7b", "backend": "torch", "queued": 0})


def test_streams_an_answer_about_an_image(client, model):
    stream = client.chat.completions.create(model="tiny-7b", messages=user("What is shown?", DATA_URI),
                                            stream=True, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    expected = model.ask(EXAMPLE, "What is shown?", temperature=0, max_new_tokens=6)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) >= 3 and text.strip() == expected.text and expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    whole = client.chat.completions.create(model="tiny-7b", messages=user("What is shown?", DATA_URI), **GREEDY)
    assert whole.choices[0].message.content == expected.text and whole.model == chunks[0].model == "tiny-7b"
    assert whole.usage.prompt_tokens == expected.prompt_tokens and whole.usage.completion_tokens == 6


def test_sse_framing(server):
    body = {"model": "tiny-7b", "messages": user("Framing?"), "stream": True, "max_tokens": 3, "temperature": 0}
    status, text = raw(server + "/v1/chat/completions", body)
    events = text.split("\n\n")
    assert status == 200 and events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"} and len({p["id"] for p in payloads}) == 1


def test_allowed_local_paths_equal_data_uris(client, allowed):
    answers = [client.chat.completions.create(model="tiny-7b", messages=user("Which organ?", url), **GREEDY)
               .choices[0].message.content for url in (DATA_URI, str(allowed / "scan.png"),
                                                      (allowed / "scan.png").as_uri())]
    assert len(set(answers)) == 1


def test_eight_concurrent_clients_get_the_sequential_answers(server, client, model):
    images = [noise_png(i) for i in range(8)]
    requests = [user(f"Question {i}: what is seen?", "data:image/png;base64," + base64.b64encode(png).decode())
                for i, png in enumerate(images)]
    sequential = [client.chat.completions.create(model="tiny-7b", messages=m, **GREEDY).choices[0].message.content
                  for m in requests]

    def ask(messages):
        own = openai.OpenAI(api_key=KEY, base_url=server + "/v1", max_retries=0, timeout=120)
        return own.chat.completions.create(model="tiny-7b", messages=messages, **GREEDY).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, requests))
    assert concurrent == sequential
    assert sequential == [model.ask(png, f"Question {i}: what is seen?", temperature=0, max_new_tokens=6).text
                          for i, png in enumerate(images)]
    assert len(set(sequential)) >= 6     # distinct answers: a mixed-up KV cache would show


def test_event_loop_answers_while_the_model_is_busy(server, client, model):
    """A request waiting for the model (held here) does not block /health."""
    done = threading.Event()
    with model.lock:
        worker = threading.Thread(target=lambda: (client.chat.completions.create(
            model="tiny-7b", messages=user("Queued?"), **GREEDY), done.set()))
        worker.start()
        deadline = time.monotonic() + 10
        while raw(server + "/health")[1]["queued"] != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert raw(server + "/health")[1]["queued"] == 1 and not done.is_set()
    worker.join(60)
    assert done.is_set() and raw(server + "/health")[1]["queued"] == 0


def test_a_client_that_hangs_up_frees_the_model(server, model):
    """A dropped stream stops its generation at the next token, not after max_tokens."""
    start = time.perf_counter()
    model.ask(None, "How long?", temperature=0, max_new_tokens=200)
    per_token = (time.perf_counter() - start) / 200
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "tiny-7b", "messages": [{"role": "user", "content": "How long?"}], "max_tokens": 2000,
            "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.read1(100).startswith(b"data: ")
    hung_up = time.perf_counter()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    while raw(server + "/health")[1]["queued"] and time.perf_counter() - hung_up < 60:
        time.sleep(0.01)
    assert time.perf_counter() - hung_up < 0.25 * 2000 * per_token     # well before the 2000 tokens


# -------------------------------------------------------------- refusals ----
def test_a_key_is_required(server):
    anonymous = openai.OpenAI(api_key="wrong", base_url=server + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        anonymous.chat.completions.create(model="tiny-7b", messages=user("Hi?"), **GREEDY)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    status, body = raw(server + "/v1/models", key=None)
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    assert raw(server + "/health", key=None)[0] == 401


def test_symlink_out_of_the_allowed_dir_is_refused(client, allowed, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(EXAMPLE.read_bytes())
    link = allowed / "link.png"
    if not link.exists():
        os.symlink(outside, link)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="tiny-7b", messages=user("x", str(link)), **GREEDY)
    assert err.value.body["code"] == "image_path_not_allowed"


BAD_REQUESTS = {
    "bad base64": (user("x", "data:image/png;base64,@@not-base64@@"), 400, "invalid_image"),
    "not an image": (user("x", "data:image/png;base64," + base64.b64encode(b"plain text").decode()), 400,
                     "invalid_image"),
    "too many images": (user("x", *[DATA_URI] * 7), 400, "too_many_images"),
    "empty messages": ([], 400, "empty_messages"),
    "no question": ([{"role": "assistant", "content": "hello"}], 400, "invalid_prompt"),
    "path outside": (user("x", str(EXAMPLE)), 403, "image_path_not_allowed"),
    "http url": (user("x", "https://example.org/x.png"), 400, "invalid_image"),
    "too many messages": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 4
                          + [{"role": "user", "content": "q"}], 413, "too_many_messages"),
    "unknown role": ([{"role": "robot", "content": "x"}], 422, "literal_error"),
    "negative max_tokens": (user("x"), 422, "greater_than_equal", {"max_tokens": 0}),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_openai_error_bodies(server, case):
    messages, status, code, *extra = BAD_REQUESTS[case]
    body = {"model": "tiny-7b", "messages": messages, "max_tokens": 2, **(extra[0] if extra else {})}
    got_status, got = raw(server + "/v1/chat/completions", body)
    assert (got_status, got["error"]["code"]) == (status, code), got
    assert set(got["error"]) == {"message", "type", "param", "code"} and got["error"]["message"].endswith(".")
    assert got["error"]["type"] == "invalid_request_error"


def declare_big_body(server, size):
    """Announce a body over the limit: the server answers 413 before it is sent."""
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    for name, value in {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                        "Content-Length": str(size)}.items():
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    try:
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_protocol_errors(server):
    url = server + "/v1/chat/completions"
    assert raw(url, b"{not json")[0] == 400
    status, body = declare_big_body(server, 3 * 1024 * 1024)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = raw(server + "/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"


# ------------------------------------------------- failures of the model ----
class _FailingModel:
    backend, path = "fake", Path("fake")

    def __init__(self, gate=None):
        self.gate = gate

    def create_chat_completion(self, messages, stream=False, **gen):
        if self.gate is not None:
            self.gate.wait(30)
        raise RuntimeError("engine exploded")


def test_model_failure_is_a_500_and_a_full_queue_a_503():
    gate = threading.Event()
    settings = ServerSettings(model_id="fake", max_queue=1)
    with background_server(_FailingModel(gate), settings) as url:
        body = {"messages": user("x"), "max_tokens": 2}
        first = ThreadPoolExecutor(1).submit(raw, url + "/v1/chat/completions", body)
        deadline = time.monotonic() + 10
        while raw(url + "/health")[1]["queued"] != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, busy = raw(url + "/v1/chat/completions", body)
        assert status == 503 and busy["error"]["code"] == "overloaded"
        gate.set()
        status, failed = first.result(30)
        assert status == 500 and failed["error"]["type"] == "server_error"
        assert "exploded" not in failed["error"]["message"]      # no internals leak to callers


def test_serve_command_refuses_a_missing_allow_dir_before_loading(tmp_path):
    from click.testing import CliRunner

    from huatuo_lite.cli.main import cli

    result = CliRunner().invoke(cli, ["serve", "-m", str(tmp_path / "no-model"), "--allow-dir",
                                      str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "--allow-dir" in result.output and "is not a folder" in result.output


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_serve_loads_with_huge_pages_unless_the_environment_says_no(tmp_path, monkeypatch, preset, expected):
    """serve lives long enough to win back huge pages' slower load (bench/decode_pages.py)."""
    from click.testing import CliRunner

    import huatuo_lite.api
    from huatuo_lite.backends.gguf_llama import HUGEPAGES_ENV
    from huatuo_lite.cli.main import cli
    from huatuo_lite.errors import HuatuoError

    seen = []

    def fake_load(model, **options):
        seen.append(os.environ.get(HUGEPAGES_ENV))
        raise HuatuoError("stop here")

    if preset is None:
        monkeypatch.delenv(HUGEPAGES_ENV, raising=False)
    else:
        monkeypatch.setenv(HUGEPAGES_ENV, preset)
    monkeypatch.setattr(huatuo_lite.api, "load", fake_load)
    result = CliRunner().invoke(cli, ["serve", "-m", str(tmp_path), "-q"])
    assert seen == [expected] and result.exit_code == 1 and "stop here" in result.output
    monkeypatch.delenv(HUGEPAGES_ENV, raising=False)   # serve set it in this process
