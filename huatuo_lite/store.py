"""Where models live and what kind each folder is.

A model folder is one of: an upstream checkpoint (config.json + safetensors:
the torch reference runs it), or a converted folder with a manifest.json whose
"format" names its backend. The kind is read from the files, never the name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ModelFormatError

# manifest "format" (or "upstream" for a checkpoint) -> the backend that runs it
FORMAT_BACKEND = {"gguf": "gguf", "onnx": "onnx", "upstream": "torch"}
DEFAULT_HOME = Path("~/.cache/huatuo-lite")


def home() -> Path:
    """The store's root: HUATUO_LITE_HOME, else ~/.cache/huatuo-lite."""
    return Path(os.environ.get("HUATUO_LITE_HOME") or DEFAULT_HOME).expanduser()


def detect_format(folder: Path) -> str:
    """"gguf", "onnx" or "upstream", from the folder's files."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            fmt = json.loads(manifest.read_text(encoding="utf-8")).get("format")
        except ValueError:
            fmt = None
        if fmt in FORMAT_BACKEND:
            return fmt
        raise ModelFormatError(f"{manifest} names no known format; convert the model again.")
    if (folder / "config.json").is_file():
        return "upstream"
    raise ModelFormatError(
        f"{folder} is not a model folder (no manifest.json or config.json); "
        "point --model at an upstream checkpoint or a folder made by `huatuo-lite convert`."
    )


def resolve(model: str | os.PathLike) -> Path:
    """A model folder from a path or a name in the store."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    stored = home() / "models" / str(model).replace("/", "--")
    if stored.is_dir():
        return stored
    if path.exists():
        raise ModelFormatError(f"{path} is a file; point --model at the model's folder.")
    raise ModelFormatError(
        f"No model {str(model)!r} here or in {home() / 'models'}; give a model folder, "
        "or convert one with `huatuo-lite convert gguf SRC OUT`."
    )


def backend_for(folder: Path, requested: str | None) -> str:
    """The backend to run `folder` with: the requested one if it fits the folder."""
    fmt = detect_format(folder)
    natural = FORMAT_BACKEND[fmt]
    if requested is None or requested == natural:
        return natural
    raise ModelFormatError(
        f"{folder} holds a {fmt} model, which the {requested} backend cannot run; "
        f"use --backend {natural}, or convert it with `huatuo-lite convert {requested} {folder} OUT`."
    )
