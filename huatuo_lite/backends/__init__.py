"""Engines behind one protocol (see base.py). Backends are imported lazily by
name so that `import huatuo_lite` never pulls torch, llama.cpp or onnxruntime."""
from __future__ import annotations

import importlib

# backend name -> module that defines `open_engine(model_dir, **options)`
BACKEND_MODULES = {
    "torch": "huatuo_lite.backends.torch",
    "gguf": "huatuo_lite.backends.gguf",
    "onnx": "huatuo_lite.backends.onnx",
}


def load_backend(name: str):
    """The backend module for `name`; an unknown name is a ValueError naming the choices."""
    try:
        module = BACKEND_MODULES[name]
    except KeyError:
        raise ValueError(
            f"Unknown backend {name!r}: choose one of {', '.join(sorted(BACKEND_MODULES))}."
        ) from None
    return importlib.import_module(module)
