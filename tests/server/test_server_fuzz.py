"""Property-based tests of the OpenAI message parser and the server's request path.

Property: every input is parsed or refused with the project's own error type
(ApiError / HuatuoError) carrying one sentence; nothing else escapes, and the
HTTP layer answers no generated body with a 500. The default profile is fast;
`pytest --long` runs the slow test with many more examples.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from huatuo_lite.generate import generation_config  # noqa: E402
from huatuo_lite.errors import HuatuoError  # noqa: E402
from huatuo_lite.openai_compat import OPTION_NAMES, messages_to_turns  # noqa: E402
from huatuo_lite.server.policy import ApiError, ServerSettings, check_messages, confine_image_paths
from huatuo_lite.server.run import background_server
from huatuo_lite.server.app import parse_request  # noqa: E402
from support.server_http import raw  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo" / "gguf"
EXAMPLE = ROOT / "models" / "examples" / "chest_xray.png"
LONG = os.environ.get("HUATUO_LITE_LONG") == "1"          # set by `pytest --long`
FAST = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
LONG_RUN = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
HTTP_FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
HTTP_LONG = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), database=None)

# ------------------------------------------------------------ strategies ----
SMALL_PNG = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
URLS = st.one_of(
    st.sampled_from([SMALL_PNG, "DATA:image/png;BASE64," + SMALL_PNG.partition(",")[2], "data:,plain",
                     "data:image/png;base64,@@", "data:image/png;base64,aGVsbG8=", "xy:scan.png", "c:scan.png",
                     "file:///etc/passwd", "file://otherhost/x.png", "file:", "http://example.org/x.png",
                     "./scan.png", "scan.png", "~/scan.png", "../../etc/passwd", "", "\x00", "a\x00b",
                     "javascript:alert(1)", "FILE:///tmp/x.png", "file:///%00", "x" * 5000]),
    st.text(max_size=40))
TEXT = st.text(alphabet=st.characters(blacklist_categories=()), max_size=30)   # surrogates included
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
PARTS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(TEXT, JSON)}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.one_of(st.fixed_dictionaries({"url": URLS}), URLS, JSON)}),
    JSON)
CONTENT = st.one_of(TEXT, st.lists(PARTS, max_size=3), JSON)
ROLES = st.one_of(st.sampled_from(["user", "assistant", "system", "developer", "robot"]), TEXT, JSON)
MESSAGE = st.one_of(st.fixed_dictionaries({"role": ROLES, "content": CONTENT}), JSON)
MESSAGES = st.one_of(st.lists(MESSAGE, max_size=4),
                     st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                     "content": CONTENT}), min_size=1, max_size=4),
                     JSON)
NUMBERS = st.one_of(st.integers(), st.floats(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, -1]), JSON)
OPTIONS = st.fixed_dictionaries({}, optional={
    "model": st.one_of(TEXT, JSON), "stream": st.one_of(st.booleans(), JSON), "n": NUMBERS,
    "temperature": NUMBERS, "top_p": NUMBERS, "top_k": NUMBERS, "seed": NUMBERS,
    "repetition_penalty": NUMBERS, "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": JSON}), JSON),
    "max_completion_tokens": st.one_of(st.integers(1, 2), JSON.filter(lambda v: v is not None))})
# max_tokens is always there and small (or junk, never null), so a valid body generates at most 2 tokens
MAX_TOKENS = st.one_of(st.integers(1, 2), st.integers(-5, 0), JSON.filter(lambda v: v is not None))


# well-formed requests with extreme but valid options: these reach generation
VALID = st.fixed_dictionaries({
    "messages": st.lists(st.one_of(st.text(max_size=20), st.lists(st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
        st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": URLS})})),
        max_size=3)).map(lambda content: {"role": "user", "content": content}), min_size=1, max_size=1),
    "max_tokens": st.integers(1, 2)}, optional={
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1, exclude_min=True), "top_k": st.integers(0, 2**31 - 1),
    "seed": st.integers(0, 2**64 - 1), "repetition_penalty": st.floats(0, 100, exclude_min=True),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "model": st.text(max_size=10)})


@st.composite
def bodies(draw) -> bytes:
    """A request body: JSON chat requests (valid or not), some raw bytes or deep nesting."""
    kind = draw(st.sampled_from(["valid", "valid", "chat", "chat", "json", "bytes", "deep"]))
    if kind == "valid":
        return json.dumps(draw(VALID)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        depth = draw(st.integers(1, 3000))
        return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    body = {**draw(OPTIONS), "messages": draw(MESSAGES), "max_tokens": draw(MAX_TOKENS)}
    return json.dumps(body).encode()


def one_sentence(message) -> bool:
    return (isinstance(message, str) and message == message.strip() and message.endswith(".")
            and "\n" not in message and "Traceback" not in message)


# --------------------------------------------------------------- parsers ----
def check_parser(messages) -> None:
    try:
        turns, images = messages_to_turns(messages)
    except HuatuoError as exc:
        assert one_sentence(str(exc)), repr(str(exc))
        return
    assert turns and turns[-1].answer is None and len(images) == sum(t.n_images for t in turns)


def check_server_path(body: bytes, server_settings: ServerSettings) -> None:
    """What the route does before generating: parse, limits, confinement, turns, options."""
    try:
        chat = parse_request(body, server_settings)
        messages = chat.message_dicts()
        check_messages(server_settings, messages)
        confine_image_paths(server_settings, messages)
        messages_to_turns(messages)
        options = chat.generation_options()
        generation_config(**{OPTION_NAMES[k]: v for k, v in options.items() if k in OPTION_NAMES})
    except ApiError as exc:
        assert 400 <= exc.status < 500 and one_sentence(exc.message), (exc.status, exc.message)
    except HuatuoError as exc:
        assert one_sentence(str(exc)), repr(str(exc))


@pytest.fixture(scope="module")
def path_settings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scans")
    (folder / "scan.png").write_bytes(EXAMPLE.read_bytes())
    return ServerSettings(model_id="fuzz", allow_dirs=(folder,))


@FAST
@given(MESSAGES)
def test_the_message_parser_parses_or_refuses_in_one_sentence(messages):
    check_parser(messages)


@FAST
@given(bodies())
def test_the_request_path_parses_or_refuses_in_one_sentence(path_settings, body):
    check_server_path(body, path_settings)


@pytest.mark.long
@LONG_RUN
@given(MESSAGES, bodies())
def test_long_parser_and_request_path(path_settings, messages, body):
    check_parser(messages)
    check_server_path(body, path_settings)


# ------------------------------------------------------------------ HTTP ----
@pytest.fixture(scope="module")
def demo_server(path_settings):
    if not DEMO.is_dir():
        pytest.skip("models/demo is not in this checkout")
    import huatuo_lite.api as api
    from huatuo_lite.model_name import model_name

    with api.load(DEMO, backend="gguf", threads=1) as model:
        settings_ = ServerSettings(model_id=model_name(model), allow_dirs=path_settings.allow_dirs)
        with background_server(model, settings_) as url:
            yield url


def check_http(url: str, body: bytes) -> None:
    status, answer = raw(url + "/v1/chat/completions", body, key=None, timeout=120)
    assert status < 500, (status, answer, body[:300])
    if status >= 400:
        assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
        assert one_sentence(answer["error"]["message"]), answer
    else:
        assert isinstance(answer, str) and answer.endswith("data: [DONE]\n\n") or answer["object"] == "chat.completion"


@HTTP_FAST
@given(bodies())
def test_the_server_never_answers_500(demo_server, body):
    check_http(demo_server, body)


@pytest.mark.long
@HTTP_LONG
@given(bodies())
def test_long_the_server_never_answers_500(demo_server, body):
    check_http(demo_server, body)
