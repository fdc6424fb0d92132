"""What the server refuses and what it reports (issues #16, #17): image URLs, Host/Origin,
Content-Type, malformed bodies as 4xx in OpenAI's shape; any model name, timings, usage."""
from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from support.server_http import DATA_URI, EXAMPLE, GREEDY, raw, user  # noqa: E402


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
