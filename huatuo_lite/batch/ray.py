"""`huatuo-lite batch --ray ADDRESS`: the records as a Ray Dataset, answered by
an actor pool with one model per actor (`map_batches` with a callable class).

Records travel as JSON text (one string column: no Arrow schema to agree on
between rows that differ in their fields); each actor reads its records'
images itself, so the driver never opens an image and a cluster only needs
the images on a path every node sees. Order is preserved (the file is written
in record order) and each record is its own block, so finished rows reach the
driver one by one, not a big block at a time.

ADDRESS: "local" starts a Ray instance in this process; anything else is
passed to ray.init (e.g. "auto", "ray://head:10001", "10.0.0.5:6379"). A Ray
already initialised by the caller is used as it is.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Callable, Sequence

from .answerer import Answerer, AnswererSpec
from .records import BatchItem
from ..errors import HuatuoError

MAX_BLOCKS = 50_000      # one block per record up to this many (a 7B answer takes seconds; Ray's per-block cost is ms)


class RayAnswerer:
    """One Ray actor: builds its own model once, then answers batches of records."""

    def __init__(self, spec: AnswererSpec):
        self.answerer = Answerer(spec)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        rows = [json.dumps(self.answerer(BatchItem.from_json(str(text))), ensure_ascii=False)
                for text in batch["item"]]
        return {"row": np.array(rows, dtype=object)}


def connect(address: str) -> bool:
    """Join (or start, for "local") a Ray instance; True when this call started it."""
    try:
        import ray
    except ImportError:
        raise HuatuoError("Batch runs on Ray need Ray Data: pip install 'huatuo-lite[batch]'.") from None
    if ray.is_initialized():
        return False
    ray.init(address=None if address == "local" else address, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    return True


def huatuo_cause(exc: BaseException) -> HuatuoError | None:
    """Our one-sentence error inside Ray's wrappers (an actor that could not load its model)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, HuatuoError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def answer_on_ray(items: Sequence[BatchItem], spec: AnswererSpec, workers: int,
                  emit: Callable[[dict], None], address: str) -> None:
    """Answer `items` on `workers` Ray actors, emitting rows in record order."""
    import ray

    started = connect(address)
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False          # ours is the progress bar
        dataset = ray.data.from_items([{"item": item.to_json()} for item in items],
                                      override_num_blocks=min(len(items), MAX_BLOCKS))
        # each actor reserves the CPUs its engine will use (--threads, default 1)
        threads = int(spec.load_options.get("threads") or 1)
        spec = replace(spec, load_options={**spec.load_options, "threads": threads})
        answered = dataset.map_batches(RayAnswerer, fn_constructor_kwargs={"spec": spec}, batch_size=1,
                                       compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads)
        for row in answered.iter_rows():
            emit(json.loads(row["row"]))
    except Exception as exc:
        cause = huatuo_cause(exc)
        if cause is not None:
            raise HuatuoError(str(cause)) from None
        raise
    finally:
        if started:
            ray.shutdown()
