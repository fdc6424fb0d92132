"""The OpenAI-compatible server: its settings, what it refuses, and how it runs.

    huatuo-lite serve --model ./hv7b-gguf --api-key s3cret --allow-dir ./scans

One model, one process: requests queue on the model's lock (an engine holds
one KV cache), generation runs in worker threads so the event loop keeps
answering. The routes live in server_app.py; this module holds the policy
(limits, which local image paths may be read, the API key) and the OpenAI-style
error bodies, so both can be read and tested without a web stack.
"""
from __future__ import annotations

import contextlib
import hmac
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import HuatuoError, ImageError, ModelFormatError, PromptError
from .family import MAX_IMAGES

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080
# A 6-image request of 2 MB PNGs is ~16 MB of base64; 32 MB leaves room.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_MESSAGES = 64
DEFAULT_MAX_QUEUE = 32      # requests admitted (running + waiting); more get 503

# one of our error classes -> the OpenAI-style `code` of its 400 body
HUATUO_ERROR_CODES = {ImageError: "invalid_image", PromptError: "invalid_prompt",
                      ModelFormatError: "model_error", HuatuoError: "invalid_request"}
# HTTP status -> OpenAI error `type` (OpenAI uses invalid_request_error for client errors)
ERROR_TYPES = {500: "server_error", 503: "server_error"}


@dataclass(frozen=True)
class ServerSettings:
    """What one server accepts. `allow_dirs` empty = no local paths at all."""

    model_id: str
    api_key: str | None = None
    allow_dirs: tuple = field(default_factory=tuple)
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
def local_image_path(url: str) -> str | None:
    """The local path an image URL names (file:// or a bare path), or None
    for URLs that are not local files (data URIs, http: refused later)."""
    if url.startswith("data:"):
        return None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if len(parsed.scheme) > 1:        # http, https, ftp...: not a path (a 1-letter scheme is a drive)
        return None
    return url


def allowed_path(settings: ServerSettings, raw: str) -> str:
    """The resolved path if it lies inside an --allow-dir folder (symlinks
    followed first, so a link cannot lead outside); a 403 otherwise."""
    if not settings.allow_dirs:
        raise ApiError(403, "This server reads no local image paths; send images as data URIs "
                            "(or start it with --allow-dir FOLDER).", "image_path_not_allowed", "messages")
    path = Path(raw).expanduser().resolve()
    if not any(path.is_relative_to(folder) for folder in settings.allow_dirs):
        raise ApiError(403, f"The image path {raw} is outside the folders this server may read; "
                            "send it as a data URI or move it into an --allow-dir folder.",
                       "image_path_not_allowed", "messages")
    return str(path)


def confine_image_paths(settings: ServerSettings, messages: list) -> None:
    """Replace every local image URL by its checked, resolved path (in place)."""
    for _, part in image_parts(messages):
        holder = part.get("image_url")
        url = holder.get("url") if isinstance(holder, dict) else holder
        if not isinstance(url, str):
            raise ApiError(400, "An image_url part needs a URL string: {'image_url': {'url': 'data:...'}}.",
                           "invalid_image", "messages")
        raw = local_image_path(url)
        if raw is not None:
            part["image_url"] = {"url": allowed_path(settings, raw)}


# ---------------------------------------------------------------- running ----
def serve(model, settings: ServerSettings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          log_level: str = "info") -> None:
    """Run the server in the foreground until Ctrl-C."""
    import uvicorn

    from .server_app import create_app

    uvicorn.run(create_app(model, settings), host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def background_server(model, settings: ServerSettings, host: str = "127.0.0.1"):
    """Serve on a free loopback port in a thread; yields the base URL
    (http://127.0.0.1:PORT). For tests and embedding; stops on exit."""
    import uvicorn

    from .server_app import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    config = uvicorn.Config(create_app(model, settings), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise HuatuoError("The server thread stopped while starting; see the log above.")
            thread.join(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
