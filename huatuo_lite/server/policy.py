"""The OpenAI-compatible server: its settings, what it refuses, and how it runs.

    huatuo-lite serve --model ./hv7b-gguf --api-key s3cret --allow-dir ./scans

One model, one process: requests queue on the model's lock (an engine holds
one KV cache), generation runs in worker threads so the event loop keeps
answering. The routes live in server/app.py; this module holds the policy
(limits, which local image paths may be read, the API key) and the OpenAI-style
error bodies, so both can be read and tested without a web stack.
"""
from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import HuatuoError, ImageError, ModelFormatError, PromptError
from ..families.llava import MAX_IMAGES
from ..openai_compat import LONE_SURROGATE, image_source, shown

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOOPBACK_NAMES = frozenset(LOOPBACK_HOSTS)
WILDCARD_HOSTS = ("0.0.0.0", "::", "")      # bound to every address: which one a client used is unknown
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080
# A 6-image request of 2 MB PNGs is ~16 MB of base64; 32 MB leaves room.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_MESSAGES = 64
DEFAULT_MAX_QUEUE = 32      # requests admitted (running + waiting); more get 503
MAX_JSON_DEPTH = 32         # an OpenAI request nests ~6 deep (body/messages/part/image_url/url)
MAX_INT_DIGITS = 20         # 2**64 - 1 has 20 digits: no option takes more

# one of our error classes -> the OpenAI-style `code` of its 400 body
HUATUO_ERROR_CODES = {ImageError: "invalid_image", PromptError: "invalid_prompt",
                      ModelFormatError: "model_error", HuatuoError: "invalid_request"}
# HTTP status -> OpenAI error `type` (OpenAI uses invalid_request_error for client errors)
ERROR_TYPES = {500: "server_error", 503: "server_error"}


@dataclass(frozen=True)
class ServerSettings:
    """What one server accepts. `allow_dirs` empty = no local paths at all;
    `bind_host` and `allow_hosts` are the Host names requests may carry."""

    model_id: str
    api_key: str | None = None
    allow_dirs: tuple = field(default_factory=tuple)
    bind_host: str = DEFAULT_HOST
    allow_hosts: tuple = field(default_factory=tuple)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_messages: int = DEFAULT_MAX_MESSAGES
    max_images: int = MAX_IMAGES
    max_queue: int = DEFAULT_MAX_QUEUE

    def __post_init__(self):
        resolved = tuple(Path(d).expanduser().resolve() for d in self.allow_dirs)
        missing = [str(d) for d in resolved if not d.is_dir()]
        if missing:
            raise HuatuoError(f"--allow-dir {missing[0]} is not a folder; give an existing folder of images.")
        object.__setattr__(self, "allow_dirs", resolved)
        object.__setattr__(self, "allow_hosts", tuple(h.strip().strip("[]").lower() for h in self.allow_hosts))


class ApiError(Exception):
    """A request refused with an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def from_huatuo_error(exc: HuatuoError) -> ApiError:
    """Bad input found by the model code (image, prompt) -> a 400 with its sentence."""
    code = next(c for kind, c in HUATUO_ERROR_CODES.items() if isinstance(exc, kind))
    return ApiError(400, str(exc), code, "messages")


# ------------------------------------------------------------------ auth ----
def check_api_key(settings: ServerSettings, authorization: str | None) -> None:
    """With a key set, every request needs `Authorization: Bearer KEY` (constant-time compare)."""
    if settings.api_key is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
        raise ApiError(401, "Missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                            "with the key the server was started with.", "invalid_api_key")


# ---------------------------------------------------------------- limits ----
def check_body_size(settings: ServerSettings, size: int) -> None:
    if size > settings.max_body_bytes:
        raise ApiError(413, f"The request body has {size} bytes, more than this server's limit of "
                            f"{settings.max_body_bytes}; send smaller or fewer images.", "request_too_large")


def check_messages(settings: ServerSettings, messages: list) -> None:
    """Count limits, checked before any image is decoded."""
    if not messages:
        raise ApiError(400, "The messages list is empty: send at least one user message with a question.",
                       "empty_messages", "messages")
    if len(messages) > settings.max_messages:
        raise ApiError(413, f"The conversation has {len(messages)} messages, more than this server's limit of "
                            f"{settings.max_messages}; start a new conversation.", "too_many_messages", "messages")
    n_images = sum(1 for _, part in image_parts(messages))
    if n_images > settings.max_images:
        raise ApiError(400, f"The conversation has {n_images} images; at most {settings.max_images} are "
                            "allowed, so send fewer.", "too_many_images", "messages")


def image_parts(messages: list):
    """(message, part) for every image_url part of list-form message contents."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    yield message, part


# ----------------------------------------------------------- local paths ----
def allowed_path(settings: ServerSettings, raw: str) -> str:
    """The resolved path if it lies inside an --allow-dir folder (symlinks
    followed first, so a link cannot lead outside); a 403 otherwise."""
    if not settings.allow_dirs:
        raise ApiError(403, "This server reads no local image paths; send images as data URIs "
                            "(or start it with --allow-dir FOLDER).", "image_path_not_allowed", "messages")
    try:
        path = Path(raw).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        path = None
    if path is None or not any(path.is_relative_to(folder) for folder in settings.allow_dirs):
        raise ApiError(403, f"The image path {shown(raw)} is outside the folders this server may read; "
                            "send it as a data URI or move it into an --allow-dir folder.",
                       "image_path_not_allowed", "messages")
    return str(path)


def confine_image_paths(settings: ServerSettings, messages: list) -> None:
    """Replace every local image URL by its checked, resolved path (in place).
    openai_compat.image_source decides what is a path, for this check and for
    the loader alike: a URL with any other scheme is refused here, not read."""
    for _, part in image_parts(messages):
        holder = part.get("image_url")
        try:
            kind, value = image_source(holder.get("url") if isinstance(holder, dict) else holder)
        except HuatuoError as exc:
            raise from_huatuo_error(exc) from None
        if kind == "path":
            part["image_url"] = {"url": allowed_path(settings, value)}


# ------------------------------------------------------- host and origin ----
def request_host_name(value: str) -> str | None:
    """The host name of a Host header or Origin URL value, lower-cased, without
    port or IPv6 brackets; None when it cannot be parsed."""
    try:
        return urlsplit(value if "//" in value else "//" + value).hostname
    except ValueError:
        return None


def host_allowed(settings: ServerSettings, name: str | None) -> bool:
    """Loopback names, the bound address, --allow-host names; on a wildcard bind
    (0.0.0.0, ::) any IP literal too. A DNS name that is none of these is what a
    DNS-rebinding page sends, so it is refused."""
    if name is None:
        return False
    if name in LOOPBACK_NAMES or name == settings.bind_host.strip("[]").lower() or name in settings.allow_hosts:
        return True
    if settings.bind_host in WILDCARD_HOSTS:
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(name)
            return True
    return False


def check_host(settings: ServerSettings, host: str | None, origin: str | None) -> None:
    """Refuse requests a web page could have sent: a foreign Host (400) or Origin (403)."""
    if host is not None and not host_allowed(settings, request_host_name(host)):
        raise ApiError(400, f"The Host header {shown(host)} is not an address of this server; call it by "
                            f"{settings.bind_host} or localhost, or start it with --allow-host NAME.", "invalid_host")
    if origin is not None and not host_allowed(settings, request_host_name(origin)):
        raise ApiError(403, f"Requests from the web page at {shown(origin)} are refused; web pages may not call "
                            "this server unless it is started with --allow-host for their host.", "forbidden_origin")


def check_json_content_type(content_type: str | None) -> None:
    """POST bodies must say they are JSON: a web form or a no-preflight fetch cannot."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"The request body has Content-Type {shown(content_type or 'none')}; send JSON "
                            "with the header 'Content-Type: application/json'.", "unsupported_media_type")


# ------------------------------------------------------------------ JSON ----
def _refuse_constant(name: str):
    raise ApiError(400, f"The request body holds {name}, which JSON does not allow; send finite numbers.",
                   "invalid_json")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ApiError(400, f"The number {text[:40]} in the request body is too large; send finite numbers.",
                       "invalid_json")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ApiError(400, f"A number in the request body has {len(text.lstrip('-'))} digits, more than the "
                            f"{MAX_INT_DIGITS} any option here takes; send a smaller number.", "invalid_json")
    return int(text)


def parse_json_body(body: bytes):
    """The request's JSON value, or a 400 for what json.loads would let through
    into a 500 later: NaN/Infinity, numbers beyond a float or 64 bits, nesting
    deeper than MAX_JSON_DEPTH, strings holding lone surrogates (not UTF-8-encodable)."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float,
                          parse_int=_bounded_int)
    except RecursionError:
        _too_deep()
    except ValueError:
        raise ApiError(400, "The request body is not valid JSON; send a JSON chat completion request.",
                       "invalid_json") from None
    _check_json_values(data)
    return data


def _too_deep():
    raise ApiError(400, f"The request body is nested more than {MAX_JSON_DEPTH} levels deep; "
                        "send a plain chat completion request.", "invalid_json")


def _check_json_values(data) -> None:
    """Depth and string checks without recursion (a deep value must not overflow our stack)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                _too_deep()
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
        elif isinstance(value, str) and LONE_SURROGATE.search(value):
            raise ApiError(400, "The request body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                                "escape); send valid Unicode text.", "invalid_json")


