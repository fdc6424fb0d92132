"""Engines behind one protocol (see base.py). Backends are imported lazily by
name so that `import huatuo_lite` never pulls torch, llama.cpp or onnxruntime."""
from __future__ import annotations

import importlib
import os
import warnings

# backend name -> module that defines `open_engine(model_dir, **options)`, from the
# formats registry (the same dict object, so tests can add a fake backend to it)
from ..formats import BACKEND_MODULES


def load_backend(name: str):
    """The backend for `name` (its module, with open_engine clamping threads); an
    unknown name is a ValueError naming the choices."""
    try:
        module = BACKEND_MODULES[name]
    except KeyError:
        raise ValueError(
            f"Unknown backend {name!r}: choose one of {', '.join(sorted(BACKEND_MODULES))}."
        ) from None
    return _Backend(importlib.import_module(module))


class _Backend:
    """A backend module whose open_engine clamps `threads`: every engine gets its
    threads here, so the clamp is in one place (512 threads on 2 cores ran for
    minutes; 100000 hung)."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, attribute):
        return getattr(self.module, attribute)

    def open_engine(self, model_dir, **options):
        if options.get("threads"):
            options["threads"] = clamp_threads(options["threads"])
        return self.module.open_engine(model_dir, **options)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def clamp_threads(threads: int) -> int:
    """At most the available CPUs, with a one-line warning when lowered."""
    threads, cpus = int(threads), available_cpus()
    if threads <= cpus:
        return threads
    # warn_explicit without a source line: one line on stderr, still a catchable warning
    warnings.warn_explicit(f"--threads {threads} is more than the {cpus} CPUs of this machine: "
                           f"using {cpus}.", UserWarning, "huatuo-lite", 0)
    return cpus
