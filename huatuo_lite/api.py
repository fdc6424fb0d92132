"""The Python API: `huatuo_lite.load(...)` -> HuatuoVision.

    import huatuo_lite

    with huatuo_lite.load("models/demo/gguf") as model:
        answer = model.ask("chest.png", "Is there a lesion?", temperature=0)
        print(answer.text, answer.usage(), answer.timings)

Backend-agnostic; a model object may be shared between threads (calls are
serialised by a lock, since an engine holds one KV cache).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, Sequence

from . import store
from .backends import load_backend
from .cache import FeatureCache
from .errors import HuatuoError
from .generate import Answer, run
from .prompt import Turn
from .generate import generation_config
from .families import generation_defaults

CLOSED = "This model was closed; load it again with huatuo_lite.load(...)."


class HuatuoVision:
    def __init__(self, engine, path: Path, backend: str):
        self.engine, self.path, self.backend = engine, path, backend
        self._lock = threading.RLock()
        self.feature_cache = FeatureCache()

    # --------------------------------------------------------------- asking
    def ask(self, images, question: str, history: Sequence[Turn] = (), **gen) -> Answer:
        """Answer one question about zero or more images (paths, bytes, PIL, arrays)."""
        with self._lock:
            generation = self._start(images, question, history, gen)
            for _ in generation:
                pass
            return generation.answer

    def stream(self, images, question: str, history: Sequence[Turn] = (), **gen) -> Iterator[str]:
        """Yield the answer's text as it is generated."""
        with self._lock:
            yield from self._start(images, question, history, gen)

    def generation(self, images, question: str, history: Sequence[Turn] = (), history_images=(), **gen):
        """A Generation to iterate (stream) whose `.answer` has the stats; hold
        `model.lock` while iterating (the CLI and chat sessions do)."""
        return self._start(images, question, history, gen, history_images)

    def chat(self):
        """A conversation that keeps its history (upstream's multi-turn format)."""
        from .chat import ChatSession

        return ChatSession(self)

    def create_chat_completion(self, messages, stream: bool = False, **gen):
        """OpenAI-style messages (text and image_url parts) -> an OpenAI-shaped
        dict, or an iterator of chunk dicts when stream=True."""
        from . import openai_compat

        return openai_compat.chat_completion(self, messages, stream, gen)

    def _start(self, images, question, history, gen, history_images=()):
        if self.engine is None:
            raise HuatuoError(CLOSED)
        return run(self.engine, as_image_list(images), question, history, generation_config(generation_defaults(self.engine), **gen),
                   history_images=history_images, cache=self.feature_cache)

    @property
    def lock(self):
        return self._lock

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        with self._lock:
            if self.engine is not None:
                self.engine.close()
                self.engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def as_image_list(images) -> list:
    """One image (path, bytes, PIL image, array) or a list/tuple of them -> a list."""
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def load(model=None, backend: str | None = None, **options) -> HuatuoVision:
    """Open a model folder or stored name with its backend (chosen from the folder
    when not given). Options go to the engine: threads, n_ctx, gpu_layers, quant.
    With no model: $HUATUO_LITE_MODEL, the one stored model, or the bundled demo
    model (a pipeline demonstration, not a medical model), as `huatuo-lite ask`."""
    if model is None:
        model = store.default_model()
        if model is None:
            raise HuatuoError("No model given: pass a model folder, e.g. huatuo_lite.load(\"./hv7b-gguf\") "
                              "(see `huatuo-lite convert --help`).")
    path = store.resolve(model)
    name = store.backend_for(path, backend)
    engine = load_backend(name).open_engine(path, **options)
    return HuatuoVision(engine, path, name)
