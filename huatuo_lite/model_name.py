"""The id a served model announces: its name and quant, e.g. HuatuoGPT-Vision-7B-Q4_K_M.

A converted folder is often called `gguf` or `onnx`; its manifest's `name` (the
GGUF naming convention's, e.g. HuatuoGPT-Vision-7B) or the checkpoint it came from
(source.path) names the model. The quant is the
one the engine opened (a GGUF folder may hold several). Tables, not branches:
NAMELESS lists folder names that say nothing, QUANT_OF reads each backend's quant.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

# folder names that name a layout, not a model: look at the folder above instead
NAMELESS = {"gguf", "onnx", "model", "models", "checkpoint", "torch", "hf", "snapshots", "out", "output"}
HUB_CACHE_DIR = re.compile(r"models--[^-].*--(?P<name>.+)")       # huggingface-hub cache: models--Org--Name
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
DEMO_NAME = "huatuo-lite-demo"      # the demo GGUF's own name (its files are huatuo-lite-demo-Q8_0...)


def _manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _gguf_quant(engine, manifest: dict):
    text = getattr(engine, "text_path", None)
    return (manifest.get("files", {}).get(text.name, {}) if text is not None else {}).get("quant")


# backend -> (engine, manifest) -> quant string or None
QUANT_OF = {
    "gguf": _gguf_quant,
    "onnx": lambda engine, manifest: manifest.get("onnx", {}).get("quant"),
    "torch": lambda engine, manifest: None,
}


def _meaningful(path: Path) -> str | None:
    """The first name on the way up from `path` that names a model (at most 3 levels)."""
    for part in [path, *path.parents][:3]:
        hub = HUB_CACHE_DIR.fullmatch(part.name)
        if hub:
            return hub.group("name")
        if part.name and part.name.lower() not in NAMELESS and not COMMIT_HASH.fullmatch(part.name):
            return part.name
    return None


def _is_demo(folder: Path) -> bool:
    from .store import demo_model

    demo = demo_model()
    return demo is not None and folder.resolve().is_relative_to(demo.resolve().parent)


def base_name(folder: Path) -> str:
    """The manifest's name, else the demo's, else its checkpoint's (source.path), else its folder's."""
    manifest = _manifest(folder)
    named = manifest.get("name")
    if isinstance(named, str) and named and named.lower() not in NAMELESS:
        return named
    if _is_demo(folder):
        return DEMO_NAME
    source = manifest.get("source", {}).get("path")
    from_source = _meaningful(Path(source)) if isinstance(source, str) and source else None
    if from_source and Path(source).name.lower() not in NAMELESS:
        return from_source
    return _meaningful(folder.resolve()) or folder.resolve().name or "model"


def model_name(model) -> str:
    """`name-QUANT` for a loaded HuatuoVision (just `name` when unquantized)."""
    folder = Path(model.path)
    name = base_name(folder)
    reader = QUANT_OF.get(getattr(model, "backend", None), lambda engine, manifest: None)
    quant = reader(getattr(model, "engine", None), _manifest(folder))
    if not quant or name.lower().endswith(str(quant).lower()):
        return name
    return f"{name}-{quant}"
