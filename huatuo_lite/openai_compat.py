"""OpenAI-style chat messages in, OpenAI-shaped dicts out (like llama-cpp-python).

    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is shown?"}]}]

Images may be data URIs, file: URLs or local paths; nothing is fetched from the
network. `image_source` is the one place that decides which of these a URL is:
the server confines what it calls a path, and the loader reads exactly that, so
the two cannot disagree. System messages before the first user message become the system
prompt of a family whose template has one (Qwen2.5-VL); LLaVA upstream has none and ignores them.
"""
from __future__ import annotations

import base64
import os
import re
import time
import uuid
from urllib.parse import unquote, urlparse

from .errors import ImageError, PromptError
from .model_name import model_name
from .prompt import Turn

# OpenAI request option -> our GenerationConfig field
OPTION_NAMES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
                "repetition_penalty": "repetition_penalty"}
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")          # RFC 3986 scheme, then ':'
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
NETWORK_SCHEMES = ("http", "https", "ftp", "ftps")
SHOWN_URL_CHARS = 80


def shown(url: str) -> str:
    """A URL as it may appear in one sentence: short, and printable (repr escapes surrogates)."""
    text = repr(url)[1:-1]
    return text if len(text) <= SHOWN_URL_CHARS else text[:SHOWN_URL_CHARS] + "..."


def url_scheme(url: str) -> str | None:
    """The URL's scheme, lower-cased, or None for a plain path. A one-letter
    scheme is a Windows drive (C:\\scans\\x.png) only on Windows."""
    match = SCHEME.match(url)
    if match is None or (len(match.group(1)) == 1 and os.name == "nt"):
        return None
    return match.group(1).lower()


def _refuse_scheme(url: str, scheme: str):
    if scheme in NETWORK_SCHEMES:
        raise ImageError(f"Image URLs are not fetched (huatuo-lite runs offline): download {shown(url)} "
                         "and send it as a data URI or a file.")
    raise ImageError(f"The image URL {shown(url)} has the scheme '{scheme}:', which is not read: send a data URI, "
                     f"a file: URL or a path (write ./{shown(url)} for a file whose name holds a colon).")


def image_source(url) -> tuple[str, str]:
    """("data", url) for a data URI (any letter case) or ("path", local path) for a
    file: URL or a plain path; every other URL is an ImageError."""
    if not isinstance(url, str) or not url:
        raise ImageError("An image_url part needs a URL string: {'image_url': {'url': 'data:...'}}.")
    scheme = url_scheme(url)
    if scheme == "data":
        return "data", url
    if scheme is None:
        path = url
    elif scheme == "file":
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ImageError(f"The file URL {shown(url)} names another machine ({shown(parsed.netloc)}); "
                             "use file:///path for a local file or send a data URI.")
        path = unquote(parsed.path)
    else:
        _refuse_scheme(url, scheme)
    if "\x00" in path or not path:
        raise ImageError(f"The image path {shown(url)} is empty or holds a NUL character; give a real file path.")
    return "path", path


def decode_data_uri(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header.lower():
        raise ImageError("Image data URIs must be base64-encoded (data:image/png;base64,...).")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise ImageError("An image data URI holds invalid base64; encode the file again.") from None


def image_from_url(url):
    """A data URI -> bytes, a file: URL or plain path -> path (see image_source)."""
    kind, value = image_source(url)
    return decode_data_uri(value) if kind == "data" else value


def _text(value) -> str:
    if not isinstance(value, str):
        raise PromptError(f"Message text must be a string, not {type(value).__name__}; send text as a JSON string.")
    if LONE_SURROGATE.search(value):
        raise PromptError("Message text holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
                          "send valid Unicode text.")
    return value


def _part_url(part: dict):
    holder = part.get("image_url")
    return holder.get("url") if isinstance(holder, dict) else holder


def message_parts(content) -> tuple[str, list]:
    """(text, images) of one message's content (a string, a list of parts or None)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return _text(content), []
    if not isinstance(content, list):
        raise PromptError(f"Message content must be a string or a list of parts, not {type(content).__name__}; "
                          "see the OpenAI chat format.")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(_text(part.get("text") or ""))
        elif kind == "image_url":
            images.append(image_from_url(_part_url(part)))
        else:
            raise PromptError(f"Message parts of type {shown(str(kind))!r} are not supported; "
                              "use text and image_url parts.")
    return "\n".join(t for t in texts if t), images


def messages_to_turns(messages) -> tuple[list, list]:
    """(turns, images): user messages open turns, assistant messages answer them."""
    if not isinstance(messages, list):
        raise PromptError("messages must be a list of {'role': ..., 'content': ...} objects; see the OpenAI chat format.")
    turns, images, system = [], [], []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role == "system":
            if not turns:
                system.append(message_parts(message.get("content"))[0])
            continue
        text, parts_images = message_parts(message.get("content") if isinstance(message, dict) else None)
        if role == "user":
            turns.append(Turn(question=text, n_images=len(parts_images),
                              system="\n".join(system) if system and not turns else None))
            images += parts_images
        elif role == "assistant" and turns and turns[-1].answer is None:
            turns[-1] = Turn(turns[-1].question, turns[-1].n_images, answer=text, system=turns[-1].system)
        else:
            raise PromptError(f"Unexpected {shown(str(role))!r} message: alternate user and assistant messages, "
                              "ending with a user one.")
    if not turns or turns[-1].answer is not None:
        raise PromptError("The last message must be a user message with the question.")
    return turns, images


def chat_completion(model, messages, stream: bool, options: dict):
    """Run the conversation; an OpenAI-shaped response or chunk iterator.
    options: OpenAI generation options, plus stream_options={"include_usage": bool}."""
    from .families import generation_defaults
    from .generate import generation_config, run_turns

    turns, images = messages_to_turns(messages)
    include_usage = bool((options.get("stream_options") or {}).get("include_usage"))
    gen = {OPTION_NAMES[k]: v for k, v in options.items() if k in OPTION_NAMES and v is not None}
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name(model)}
    with model.lock:
        generation = run_turns(model.engine, turns, images, generation_config(generation_defaults(model.engine), **gen),
                               model.feature_cache)
        if not stream:
            for _ in generation:
                pass
            return completion_dict(meta, generation.answer)
    return stream_chunks(model, generation, meta, include_usage)


def usage(answer) -> dict:
    return answer.usage()


def timings(answer) -> dict:
    """llama-server's `timings` object (Answer.llama_timings, shared with `ask --json`)."""
    return answer.llama_timings()


def completion_dict(meta: dict, answer) -> dict:
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish_reason}],
            "usage": usage(answer), "timings": timings(answer)}


def stream_chunks(model, generation, meta: dict, include_usage: bool = False):
    """Chunks as OpenAI streams them; with include_usage every chunk has usage: null
    and a last chunk has empty choices and the usage. The last chunk has timings."""
    def chunk(delta, finish=None):
        base = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return {**base, "usage": None} if include_usage else base

    with model.lock:
        yield chunk({"role": "assistant"})
        for piece in generation:
            yield chunk({"content": piece})
        answer = generation.answer
        last = chunk({}, answer.finish_reason)
        if not include_usage:
            yield {**last, "timings": timings(answer)}
            return
        yield last
        yield {**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage(answer),
               "timings": timings(answer)}

