"""The FastAPI app behind `huatuo-lite serve`: /v1/chat/completions, /v1/models, /health.

Generation blocks (it holds the model lock for a whole answer), so every
request runs in a worker thread of the app's own pool; the event loop only
moves bytes. A streamed answer is produced by one worker thread from start to
end (the model lock is re-entrant per thread, so the iterator must not hop
threads) and handed to the response through an asyncio queue.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import HuatuoError
from .policy import (ApiError, ServerSettings, check_api_key, check_body_size, check_host,
                     check_json_content_type, check_messages, confine_image_paths, from_huatuo_error,
                     parse_json_body)

log = logging.getLogger("huatuo_lite.server")
END = object()              # end of a streamed answer, put on its queue
GENERATION_OPTIONS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
                      "repetition_penalty", "stream_options")
INT32_MAX, UINT64_MAX = 2**31 - 1, 2**64 - 1     # bounds no engine overflows on
ROLE_ALIASES = {"developer": "system"}   # newer OpenAI name; upstream ignores system text anyway


# -------------------------------------------------------------- request ----
class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The OpenAI fields we honour; others (stop, logprobs, tools...) are ignored.
    `model` may be anything: one model is served (as llama-server does)."""

    model_config = ConfigDict(allow_inf_nan=False)
    model: str | None = None
    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    repetition_penalty: float | None = Field(None, gt=0, le=100)

    def message_dicts(self) -> list[dict]:
        dicts = [m.model_dump(exclude_none=True) for m in self.messages]
        return [{**d, "role": ROLE_ALIASES.get(d["role"], d["role"])} for d in dicts]

    def generation_options(self) -> dict:
        options = {name: getattr(self, name) for name in GENERATION_OPTIONS if getattr(self, name) is not None}
        if self.stream_options is not None:
            options["stream_options"] = self.stream_options.model_dump()
        return options


async def read_body(request: Request, settings: ServerSettings) -> bytes:
    """The body, refused with 413 as soon as it passes the limit (not after reading it all)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        check_body_size(settings, int(declared))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        check_body_size(settings, len(body))
    return bytes(body)


def parse_request(body: bytes, settings: ServerSettings) -> ChatRequest:
    data = parse_json_body(body)
    if not isinstance(data, dict):
        raise ApiError(400, f"The request body is a JSON {type(data).__name__}, not an object; send "
                            '{"messages": [...]} as in the OpenAI chat format.', "invalid_json")
    try:
        chat = ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(422, f"Field {param}: {first['msg']}; fix the request.", first["type"], param) from None
    if chat.n != 1:
        raise ApiError(400, "Only n=1 is supported: send one request per answer.", "unsupported_value", "n")
    return chat


# ----------------------------------------------------------------- workers ----
class Workers:
    """The app's worker threads and its admission count (running + waiting)."""

    def __init__(self, max_queue: int):
        self.pool = ThreadPoolExecutor(max_workers=max_queue, thread_name_prefix="huatuo-gen")
        self.max_queue, self.admitted = max_queue, 0
        self._count_lock = threading.Lock()

    def admit(self) -> None:
        with self._count_lock:
            if self.admitted >= self.max_queue:
                raise ApiError(503, f"The server already has {self.max_queue} requests queued; retry shortly.",
                               "overloaded")
            self.admitted += 1

    def release(self) -> None:
        with self._count_lock:
            self.admitted -= 1

    def submit(self, loop, fn, *args):
        """Run fn in a worker; the admission is released by the worker itself,
        so a cancelled request still counts until its generation ends."""
        self.admit()

        def job():
            try:
                return fn(*args)
            finally:
                self.release()

        return loop.run_in_executor(self.pool, job)


def model_errors(fn):
    """Our bad-input errors become 400s; the rest is logged and a plain 500."""
    try:
        return fn()
    except (ApiError, HuatuoError):
        raise
    except Exception:
        log.exception("generation failed")
        raise ApiError(500, "The model failed while answering; see the server log.", "server_error") from None


# -------------------------------------------------------------- streaming ----
async def stream_completion(workers: Workers, model, messages: list, gen: dict, model_id: str) -> StreamingResponse:
    """Start the answer in one worker thread; errors before the first chunk
    (bad image, prompt too long) become a normal error response."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    started = loop.create_future()
    stop = threading.Event()

    def settle(outcome, exc=None):
        if not started.done():
            started.set_exception(exc) if exc else started.set_result(outcome)

    def produce():
        try:
            chunks = model.create_chat_completion(messages, stream=True, **gen)
        except BaseException as exc:               # reported to the request, not lost in the thread
            loop.call_soon_threadsafe(settle, None, exc)
            return
        loop.call_soon_threadsafe(settle, True)
        try:
            for chunk in chunks:
                if stop.is_set():                  # client gone: free the model now
                    break
                loop.call_soon_threadsafe(queue.put_nowait, {**chunk, "model": model_id})
        except Exception as exc:
            log.exception("generation failed mid-stream")
            loop.call_soon_threadsafe(queue.put_nowait, ApiError(500, f"The model failed while answering: {exc}"))
        finally:
            chunks.close()
            loop.call_soon_threadsafe(queue.put_nowait, END)

    workers.submit(loop, produce)
    try:
        await started
    except HuatuoError as exc:
        raise from_huatuo_error(exc) from None
    except ApiError:
        raise
    except Exception:
        log.exception("generation failed before streaming")
        raise ApiError(500, "The model failed while answering; see the server log.", "server_error") from None
    return StreamingResponse(sse_events(queue, stop), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def sse_events(queue: asyncio.Queue, stop: threading.Event):
    """`data: {chunk}\\n\\n` per chunk, then `data: [DONE]\\n\\n` (OpenAI's SSE framing)."""
    try:
        while (item := await queue.get()) is not END:
            payload = item.body() if isinstance(item, ApiError) else item
            yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        stop.set()


# ------------------------------------------------------------------- app ----
def error_response(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal in OpenAI's shape: {"error": {message, type, param, code}}."""

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(HuatuoError)
    async def huatuo_error(request, exc: HuatuoError):
        return error_response(from_huatuo_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}; "
                                       "see /v1/models and /v1/chat/completions.", "not_found"
                                       if exc.status_code == 404 else "http_error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error_response(ApiError(422, f"Invalid request: {exc.errors()[0]['msg']}.", "invalid_value"))

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        log.exception("unhandled error")
        return error_response(ApiError(500, "Internal server error; see the server log.", "server_error"))


def create_app(model, settings: ServerSettings) -> FastAPI:
    """The app serving `model` (a HuatuoVision) under `settings`."""
    workers = Workers(settings.max_queue)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        workers.pool.shutdown(wait=False, cancel_futures=True)

    async def same_site(request: Request):
        check_host(settings, request.headers.get("host"), request.headers.get("origin"))

    async def authorized(request: Request):
        check_api_key(settings, request.headers.get("authorization"))

    app = FastAPI(title="huatuo-lite", lifespan=lifespan, dependencies=[Depends(same_site), Depends(authorized)],
                  docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    model_card = {"id": settings.model_id, "object": "model", "created": created, "owned_by": "huatuo-lite"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, "backend": model.backend,
                "queued": workers.admitted}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != settings.model_id:
            raise ApiError(404, f"The model {model_id!r} is not served here; see /v1/models.", "model_not_found")
        return model_card

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_json_content_type(request.headers.get("content-type"))
        chat = parse_request(await read_body(request, settings), settings)
        messages = chat.message_dicts()
        check_messages(settings, messages)
        confine_image_paths(settings, messages)
        gen = chat.generation_options()
        if chat.stream:
            return await stream_completion(workers, model, messages, gen, settings.model_id)
        loop = asyncio.get_running_loop()
        result = await workers.submit(loop, model_errors,
                                      lambda: model.create_chat_completion(messages, stream=False, **gen))
        return {**result, "model": settings.model_id}     # the id clients know (--model-id), not the folder

    return app
