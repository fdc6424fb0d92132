"""Run the huatuo-lite CLI with one pause point, for tests/cli/test_signals.py.

    python tests/support/signal_driver.py POINT convert gguf SRC OUT ...

At POINT the run prints "PAUSED POINT" on stderr and sleeps PAUSE_S seconds, so
the test can send a signal at a known moment of the real command; everything
else is the unpatched CLI (main() installs the signal handlers as usual).
Points (a table: name -> (module, attribute, pause before or after the call)):
"""
from __future__ import annotations

import importlib
import os
import sys
import time

PAUSE_S = 3.0
POINTS = {
    "gguf-text-written": ("huatuo_lite.convert.gguf.export", "write_mmproj", "before"),
    "gguf-vision": ("huatuo_lite.convert.gguf.export", "_write_vision", "before"),
    "onnx-first-graph": ("huatuo_lite.convert.onnx.export", "check_graph", "after"),
    "batch-first-row": ("huatuo_lite.batch.run", "OrderedWriter.add", "after"),
}


def pause(point: str) -> None:
    print(f"PAUSED {point}", file=sys.stderr, flush=True)
    time.sleep(PAUSE_S)


def patch_call(point: str) -> None:
    module_name, attr, when = POINTS[point]
    owner = importlib.import_module(module_name)
    *parents, name = attr.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original, done = getattr(owner, name), []

    def paused(*args, **kwargs):
        if when == "before" and not done:
            done.append(1)
            pause(point)
        result = original(*args, **kwargs)
        if when == "after" and not done:
            done.append(1)
            pause(point)
        return result

    setattr(owner, name, paused)


def patch_final_moves(point: str) -> None:
    """Pause inside the first rename of a staged or partial output into place
    (where signals are held: the output must still be completed)."""
    original, done = os.replace, []

    def replace(src, dst, *args, **kwargs):
        into_place = (".staging-" in str(src) or ".partial-" in str(src)) and ".staging-" not in str(dst)
        if not done and into_place:
            done.append(1)
            pause(point)
        return original(src, dst, *args, **kwargs)

    os.replace = replace


def patch_tiny_built(point: str) -> None:
    import huatuo_lite.convert.tiny.make as tiny

    for variant, build in list(tiny.VARIANT_BUILDERS.items()):
        def built(*args, _build=build, **kwargs):
            _build(*args, **kwargs)
            pause(point)
        tiny.VARIANT_BUILDERS[variant] = built


if __name__ == "__main__":
    point, *args = sys.argv[1:]
    if point == "final-moves":
        patch_final_moves(point)
    elif point == "tiny-built":
        patch_tiny_built(point)
    elif point != "none":
        patch_call(point)
    sys.argv = ["huatuo-lite", *args]
    from huatuo_lite.cli.main import main

    main()
