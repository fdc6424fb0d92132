"""OpenAI-style chat messages in, OpenAI-shaped dicts out (like llama-cpp-python).

    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is shown?"}]}]

Images may be data URIs, file:// URLs or local paths; nothing is fetched from the
network. Upstream has no system prompt: system messages are ignored.
"""
from __future__ import annotations

import base64
import time
import uuid
from urllib.parse import unquote, urlparse

from .errors import ImageError, PromptError
from .prompt import Turn

# OpenAI request option -> our GenerationConfig field
OPTION_NAMES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
                "repetition_penalty": "repetition_penalty"}


def image_from_url(url: str):
    """A data URI -> bytes, a file:// URL -> path, a plain path -> path."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ImageError("Image data URIs must be base64-encoded (data:image/png;base64,...).")
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError:
            raise ImageError("An image data URI holds invalid base64; encode the file again.") from None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme in ("http", "https"):
        raise ImageError(f"Image URLs are not fetched (huatuo-lite runs offline): download {url} and pass the file.")
    return url


def message_parts(content) -> tuple[str, list]:
    """(text, images) of one message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return content, []
    texts, images = [], []
    for part in content or []:
        kind = part.get("type")
        if kind == "text":
            texts.append(part.get("text", ""))
        elif kind == "image_url":
            url = part["image_url"]["url"] if isinstance(part.get("image_url"), dict) else part.get("image_url")
            images.append(image_from_url(url))
        else:
            raise PromptError(f"Message parts of type {kind!r} are not supported; use text and image_url parts.")
    return "\n".join(t for t in texts if t), images


def messages_to_turns(messages) -> tuple[list, list]:
    """(turns, images): user messages open turns, assistant messages answer them."""
    turns, images = [], []
    for message in messages:
        role = message.get("role")
        if role == "system":
            continue
        text, parts_images = message_parts(message.get("content"))
        if role == "user":
            turns.append(Turn(question=text, n_images=len(parts_images)))
            images += parts_images
        elif role == "assistant" and turns and turns[-1].answer is None:
            turns[-1] = Turn(turns[-1].question, turns[-1].n_images, answer=text)
        else:
            raise PromptError(f"Unexpected {role!r} message: alternate user and assistant messages, ending with a user one.")
    if not turns or turns[-1].answer is not None:
        raise PromptError("The last message must be a user message with the question.")
    return turns, images


def chat_completion(model, messages, stream: bool, options: dict):
    """Run the conversation; an OpenAI-shaped response or chunk iterator."""
    from .api import generation_config
    from .generate import run_turns

    turns, images = messages_to_turns(messages)
    gen = {OPTION_NAMES[k]: v for k, v in options.items() if k in OPTION_NAMES and v is not None}
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.path.name}
    with model.lock:
        generation = run_turns(model.engine, turns, images, generation_config(**gen), model.feature_cache)
        if not stream:
            for _ in generation:
                pass
            return completion_dict(meta, generation.answer)
    return stream_chunks(model, generation, meta)


def completion_dict(meta: dict, answer) -> dict:
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish_reason}],
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                      "total_tokens": answer.prompt_tokens + answer.completion_tokens}}


def stream_chunks(model, generation, meta: dict):
    def chunk(delta, finish=None):
        return {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    with model.lock:
        yield chunk({"role": "assistant"})
        for piece in generation:
            yield chunk({"content": piece})
        yield chunk({}, generation.answer.finish_reason)
