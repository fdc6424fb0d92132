"""Fixtures for the Qwen2.5-VL family: the tiny checkpoint in both tensor layouts (made
once per session), transformers' processor for it and the torch reference engine.
Plain helpers are in qwen_helpers.py."""
from __future__ import annotations

import pytest
from qwen_helpers import LAYOUTS, open_processor


@pytest.fixture(scope="session")
def qwen_tiny_folders(tmp_path_factory) -> dict:
    """layout -> a tiny HuatuoGPT-Vision-7B-Qwen2.5VL folder (same weights in both)."""
    from huatuo_lite.convert.qwen25vl.tiny import make_tiny_qwen25vl

    root = tmp_path_factory.mktemp("qwen25vl")
    return {layout: make_tiny_qwen25vl(root / layout, layout=layout) for layout in LAYOUTS}


@pytest.fixture(scope="session", params=LAYOUTS)
def qwen_tiny(request, qwen_tiny_folders):
    return qwen_tiny_folders[request.param]


@pytest.fixture(scope="session")
def qwen_processors(qwen_tiny_folders) -> dict:
    return {layout: open_processor(folder) for layout, folder in qwen_tiny_folders.items()}


@pytest.fixture(scope="session")
def qwen_engines(qwen_tiny_folders):
    """layout -> the torch reference engine (one thread), through open_engine's dispatch."""
    from huatuo_lite.convert.reference.engine import open_engine

    engines = {layout: open_engine(folder, threads=1) for layout, folder in qwen_tiny_folders.items()}
    yield engines
    for engine in engines.values():
        engine.close()
