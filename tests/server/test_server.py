"""The OpenAI-compatible server, called by the official openai client over loopback."""
from __future__ import annotations

import base64
import contextlib
import http.client
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import huatuo_lite.api as api  # noqa: E402
from huatuo_lite.server.policy import ServerSettings
from huatuo_lite.server.run import background_server  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "models" / "examples" / "chest_xray.png"
KEY = "test-key-123"
GREEDY = dict(temperature=0, max_tokens=6)
DATA_URI = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()


def user(text, *urls):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def model(tiny_7b):
    with api.load(tiny_7b, backend="torch") as hv:
        yield hv


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("allowed")
    (folder / "scan.png").write_bytes(EXAMPLE.read_bytes())
    return folder


@pytest.fixture(scope="module")
def server(model, allowed):
    settings = ServerSettings(model_id="tiny-7b", api_key=KEY, allow_dirs=(allowed,),
                              max_body_bytes=2 * 1024 * 1024, max_messages=8)
    with background_server(model, settings) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(api_key=KEY, base_url=server + "/v1", max_retries=0, timeout=60)


def raw(url, body=None, key=KEY, method=None, headers=None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
               **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


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


def noise_png(seed: int) -> bytes:
    """A 64x64 noise image: the tiny model answers differently for each."""
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


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


# ------------------------------------------- hardening (issue #16, #17) ----
@pytest.fixture(scope="module")
def open_server(model):
    """No key and no --allow-dir: the defaults of `huatuo-lite serve`."""
    with background_server(model, ServerSettings(model_id="tiny-7b", allow_hosts=("scanner.lan",))) as url:
        yield url


def test_a_schemed_name_is_not_read_from_the_working_directory(open_server, tmp_path, monkeypatch):
    """`xy:scan.png` once skipped the --allow-dir check (it has a "scheme") and
    the loader then read ./xy:scan.png: now one rule refuses it before either."""
    (tmp_path / "xy:scan.png").write_bytes(EXAMPLE.read_bytes())
    monkeypatch.chdir(tmp_path)
    status, body = raw(open_server + "/v1/chat/completions", {"messages": user("x", "xy:scan.png"), "max_tokens": 2})
    assert (status, body["error"]["code"]) == (400, "invalid_image"), body
    assert body["error"]["message"] == ("The image URL xy:scan.png has the scheme 'xy:', which is not read: send a "
                                        "data URI, a file: URL or a path (write ./xy:scan.png for a file whose "
                                        "name holds a colon).")
    for url in ("./xy:scan.png", (tmp_path / "xy:scan.png").as_uri(), "FILE:xy:scan.png"):
        status, body = raw(open_server + "/v1/chat/completions", {"messages": user("x", url), "max_tokens": 2})
        assert (status, body["error"]["code"]) == (403, "image_path_not_allowed"), (url, body)


def test_upper_case_data_uris_are_data(open_server):
    upper = "DATA:image/png;BASE64," + DATA_URI.partition(",")[2]
    answers = [raw(open_server + "/v1/chat/completions", {"messages": user("Which organ?", uri), **GREEDY})
               for uri in (DATA_URI, upper)]
    assert answers[0][0] == answers[1][0] == 200
    assert answers[0][1]["choices"][0]["message"] == answers[1][1]["choices"][0]["message"]


@pytest.mark.parametrize("url", ["file://otherhost/scan.png", "ftp://example.org/x.png", "javascript:alert(1)"])
def test_other_image_urls_are_400(open_server, url):
    status, body = raw(open_server + "/v1/chat/completions", {"messages": user("x", url), "max_tokens": 2})
    assert (status, body["error"]["code"]) == (400, "invalid_image") and body["error"]["message"].endswith("."), body


def test_a_foreign_host_or_origin_is_refused(open_server):
    """DNS rebinding sends the attacker's name as Host; a cross-site fetch sends its Origin."""
    port = open_server.rpartition(":")[2]
    status, body = raw(open_server + "/v1/models", headers={"Host": f"evil.example:{port}"})
    assert (status, body["error"]["code"]) == (400, "invalid_host"), body
    assert body["error"]["message"] == (f"The Host header evil.example:{port} is not an address of this server; "
                                        "call it by 127.0.0.1 or localhost, or start it with --allow-host NAME.")
    status, body = raw(open_server + "/v1/models", headers={"Origin": "https://evil.example"})
    assert (status, body["error"]["code"]) == (403, "forbidden_origin"), body
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"SCANNER.lan:{port}", "localhost"):
        assert raw(open_server + "/health", headers={"Host": host})[0] == 200, host
    assert raw(open_server + "/health", headers={"Origin": f"http://localhost:{port}"})[0] == 200


def test_post_bodies_must_be_json(open_server):
    body = json.dumps({"messages": user("x"), "max_tokens": 2}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, got = raw(open_server + "/v1/chat/completions", body, headers={"Content-Type": content_type})
        assert (status, got["error"]["code"]) == (415, "unsupported_media_type"), content_type
    status, _ = raw(open_server + "/v1/chat/completions", body,
                    headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert status == 200


MALFORMED = {
    "deep nesting": (b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "invalid_json"),
    "nesting past the limit": (b'{"messages": [{"role": "user", "content": "x", "extra": '
                               + b"[" * 40 + b"]" * 40 + b"}]}", 400, "invalid_json"),
    "huge integer": (b'{"messages": [], "max_tokens": 1' + b"0" * 5000 + b"}", 400, "invalid_json"),
    "huge float": (b'{"messages": [], "temperature": 1e999}', 400, "invalid_json"),
    "NaN temperature": (b'{"messages": [], "temperature": NaN}', 400, "invalid_json"),
    "Infinity top_p": (b'{"messages": [], "top_p": -Infinity}', 400, "invalid_json"),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "\\ud800 what?"}]}', 400, "invalid_json"),
    "invalid UTF-8": (b'{"messages": [{"role": "user", "content": "\xff"}]}', 400, "invalid_json"),
    "a list body": (b"[1, 2]", 400, "invalid_json"),
    "a string body": (b'"hello"', 400, "invalid_json"),
    "negative seed": (b'{"messages": [], "seed": -1}', 422, "greater_than_equal"),
    "seed past 64 bits": (b'{"messages": [], "seed": 18446744073709551616}', 422, "less_than_equal"),
    "temperature as text": (b'{"messages": [], "temperature": "hot"}', 422, "float_parsing"),
    "inf as text": (b'{"messages": [], "repetition_penalty": "inf"}', 422, "finite_number"),
    "messages not a list": (b'{"messages": {"role": "user"}}', 422, "list_type"),
    "content a number": (b'{"messages": [{"role": "user", "content": 5}]}', 422, "string_type"),
    "max_tokens huge": (b'{"messages": [], "max_tokens": 99999999999}', 422, "less_than_equal"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_bodies_are_4xx_in_openai_shape(open_server, case):
    body, status, code = MALFORMED[case]
    got_status, got = raw(open_server + "/v1/chat/completions", body)
    assert (got_status, got["error"]["code"]) == (status, code), got
    assert set(got["error"]) == {"message", "type", "param", "code"} and got["error"]["message"].endswith(".")


def test_any_model_name_is_served_and_timings_are_reported(open_server):
    status, body = raw(open_server + "/v1/chat/completions", {"model": "gpt-4o", "messages": user("x"), **GREEDY})
    assert status == 200 and body["model"] == "tiny-7b"
    t = body["timings"]
    assert t["prompt_n"] == body["usage"]["prompt_tokens"] and t["predicted_n"] == body["usage"]["completion_tokens"]
    assert t["prompt_ms"] > 0 and t["predicted_ms"] > 0 and t["prompt_per_second"] > 0
    assert t["predicted_per_second"] == pytest.approx((t["predicted_n"] - 1) / t["predicted_ms"] * 1000)


def test_include_usage_with_the_openai_client(open_server):
    client = openai.OpenAI(api_key="unused", base_url=open_server + "/v1", max_retries=0, timeout=60)
    chunks = list(client.chat.completions.create(model="anything", messages=user("Usage?"), stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 6 and last.usage.total_tokens == (
        last.usage.prompt_tokens + 6)
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason == "length"
    assert last.model_extra["timings"]["predicted_n"] == 6
    plain = list(client.chat.completions.create(model="anything", messages=user("Usage?"), stream=True, **GREEDY))
    assert plain[-1].choices[0].finish_reason == "length" and plain[-1].model_extra["timings"]["predicted_n"] == 6
    assert "usage" not in plain[0].model_fields_set
    whole = client.chat.completions.create(model="anything", messages=user("Usage?"), **GREEDY)
    assert whole.model == "tiny-7b" and whole.model_extra["timings"]["prompt_n"] == whole.usage.prompt_tokens
    assert [m.id for m in client.models.list().data] == ["tiny-7b"]


# ------------------------------------------------------------ memory ----
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DEMO = Path(__file__).resolve().parents[2] / "models" / "demo" / "gguf"
LEAK_BYTES_PER_REQUEST = 10 * 1024     # a leak this size per request would add 10 MB over 1000


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def memory_requests(n_images: int):
    """The rotation each round of the RSS test sends: answers, streams, refusals."""
    images = ["data:image/png;base64," + base64.b64encode(noise_png(i)).decode() for i in range(n_images)]
    for index in itertools.count():
        image = images[index % n_images]
        yield [{"messages": user("What is seen?", image), "max_tokens": 2, "temperature": 0},
               {"messages": user("Stream?", image), "max_tokens": 2, "stream": True,
                "stream_options": {"include_usage": True}},
               {"messages": user("x", "xy:scan.png"), "max_tokens": 2},
               b'{"messages": [{"role": "user", "content": "\\ud800"}]}'][index % 4]


@pytest.mark.long
@pytest.mark.skipif(not DEMO.is_dir() or not Path("/proc/self/status").exists(),
                    reason="needs models/demo and /proc")
def test_rss_stays_flat_over_1000_requests(tmp_path):
    """`huatuo-lite serve` on the demo model: resident memory after 1000 more
    requests (answers, streams, refusals) is within a small leak's worth of
    what it was after a warm-up that filled the image cache and the allocators."""
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "huatuo_lite.cli", "serve", "-m", str(DEMO), "--port", str(port),
                               "--threads", "1", "-q"], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "HUATUO_LITE_NO_NOTICE": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            with contextlib.suppress(OSError):
                if raw(base + "/health", key=None)[0] == 200:
                    break
            time.sleep(0.2)
        loaded = rss_mb(server.pid)
        requests = memory_requests(8)
        statuses = {}
        for count in (200, 1000):
            for body in itertools.islice(requests, count):
                status = raw(base + "/v1/chat/completions", body, key=None)[0]
                statuses[status] = statuses.get(status, 0) + 1
            if count == 200:
                warm = rss_mb(server.pid)
        after = rss_mb(server.pid)
        print(f"serve RSS: loaded {loaded:.1f} MB, after 200 warm-up requests {warm:.1f} MB, "
              f"after 1000 more {after:.1f} MB; statuses {statuses}")
        assert statuses == {200: 600, 400: 600}
        assert after - warm < 1000 * LEAK_BYTES_PER_REQUEST / 2**20
    finally:
        server.terminate()
        server.wait(20)
        log.close()


def test_the_announced_id_is_the_models_name_and_quant(tmp_path):
    from types import SimpleNamespace

    from huatuo_lite.model_name import model_name

    snapshot = tmp_path / "hub" / "models--FreedomIntelligence--HuatuoGPT-Vision-7B" / "snapshots" / ("ab" * 20)
    folder = tmp_path / "hv7b" / "gguf"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": "gguf", "source": {"path": str(snapshot)}, "files": {
        "m-Q4_K_M.gguf": {"quant": "Q4_K_M"}, "m-Q8_0.gguf": {"quant": "Q8_0"}}}))
    opened = SimpleNamespace(text_path=folder / "m-Q4_K_M.gguf")
    assert model_name(SimpleNamespace(path=folder, backend="gguf", engine=opened)) == "HuatuoGPT-Vision-7B-Q4_K_M"
    (folder / "manifest.json").write_text(json.dumps({"format": "onnx", "source": {"path": "/x/checkpoint"},
                                                      "onnx": {"quant": "int4"}}))
    assert model_name(SimpleNamespace(path=folder, backend="onnx", engine=None)) == "hv7b-int4"
    (folder / "manifest.json").write_text(json.dumps({"format": "onnx", "name": "HuatuoGPT-Vision-34B",
                                                      "onnx": {"quant": "int8"}}))
    assert model_name(SimpleNamespace(path=folder, backend="onnx", engine=None)) == "HuatuoGPT-Vision-34B-int8"
    if DEMO.is_dir():
        for backend in ("gguf", "onnx"):
            with api.load(DEMO.parent / backend, backend=backend, threads=1) as demo:
                assert model_name(demo) == {"gguf": "huatuo-lite-demo-Q8_0", "onnx": "huatuo-lite-demo-int8"}[backend]
