"""`huatuo-lite batch`: answer every record of a dataset into a JSONL file.

    summary = run_batch("test_vqa.json", "models/demo", "results.jsonl", workers=2)
    summary = run_batch("pubmedvision.json", "./hv7b-gguf", "out.jsonl", ray_address="auto")

Workers (each with its own model) run in this process (1 worker), in a local
process pool (N), or as Ray Data actors (batch/ray.py). Whatever runs them,
rows reach the results file here, one JSON line per record, appended and
flushed as soon as every earlier record is written, so the file is always
in record order and a killed run loses at most the lines in flight. A rerun
skips the records already in the file (a torn last line is cut off first) and
refuses a file made with other settings. Greedy by default, with eval's token
budget for eval records, so batch answers equal `huatuo-lite eval`'s.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .records import BatchItem, load_batch_items
from ..errors import HuatuoError
from ..fsutil import disk_full_error
from ..interrupt import Interrupted
from ..resume import check_settings, read_rows
from .answerer import Answerer, AnswererSpec

IN_FLIGHT_PER_WORKER = 2    # pool requests queued per worker: keeps workers busy, the reorder buffer small


# ------------------------------------------------------------ results file ----
def read_done(out: Path, items: Sequence[BatchItem]) -> dict:
    """Rows already in `out` by record index (the last row wins; rows with an
    error are retried). A torn last line (a kill mid-write) is cut off so
    appending starts on a fresh line."""
    done = {}
    for row in read_rows(out, {item.index: item.key for item in items}):
        if row.get("error") is None:
            done[row["index"]] = row
        else:
            done.pop(row["index"], None)
    return done


class OrderedWriter:
    """Appends rows to the open file in `order` (record indices), holding
    back rows that arrive before an earlier one."""

    def __init__(self, handle, order: Iterable[int], on_written: Callable[[dict], None] = lambda row: None):
        self.handle, self.pending, self.on_written = handle, {}, on_written
        self.order, self.position = list(order), 0

    def add(self, row: dict) -> None:
        self.pending[row["index"]] = row
        while self.position < len(self.order) and self.order[self.position] in self.pending:
            ready = self.pending.pop(self.order[self.position])
            self.handle.write(json.dumps(ready, ensure_ascii=False) + "\n")
            self.handle.flush()
            self.position += 1
            self.on_written(ready)


def compact(out: Path, items: Sequence[BatchItem]) -> None:
    """Rewrite `out` (atomically) with one row per record in record order,
    when retried rows or an older run left it otherwise."""
    from ..fsutil import atomic_path

    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    indices = [row["index"] for row in rows]
    if indices == sorted(set(indices)):
        return
    last = {row["index"]: row for row in rows}
    with atomic_path(out) as tmp:
        tmp.write_text("".join(json.dumps(last[i], ensure_ascii=False) + "\n" for i in sorted(last)),
                       encoding="utf-8")


def check_run_info(out: Path, info: dict) -> None:
    """Refuse to resume a results file made with another model or settings; the
    settings of a results file that is gone are stale and written anew."""
    path = out.with_name(out.name + ".run.json")
    if path.is_file() and not out.is_file():
        path.unlink()
    check_settings(path, info, out)


# ---------------------------------------------------------------- runners ----
def answer_here(items, spec: AnswererSpec, workers: int, emit: Callable[[dict], None]) -> None:
    """One worker, in this process."""
    answerer = Answerer(spec)
    try:
        for item in items:
            emit(answerer(item))
    finally:
        answerer.close()


_worker: Answerer | None = None     # the model of a pool worker process


def _start_worker(spec: AnswererSpec) -> None:
    global _worker
    _worker = Answerer(spec)


def _answer_in_worker(item: BatchItem) -> dict:
    return _worker(item)


def answer_in_pool(items, spec: AnswererSpec, workers: int, emit: Callable[[dict], None]) -> None:
    """N worker processes, each loading its own model (spawned: no forked engine state)
    and, unless told, an equal share of the cores; a bounded window of requests
    in flight, submitted in record order."""
    share = {"threads": max(1, (os.cpu_count() or 1) // workers)}
    spec = replace(spec, load_options={**share, **spec.load_options})
    queue = list(items)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(spec,)) as pool:
        running = set()
        try:
            while queue or running:
                while queue and len(running) < workers * IN_FLIGHT_PER_WORKER:
                    running.add(pool.submit(_answer_in_worker, queue.pop(0)))
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    emit(future.result())
        except BaseException:
            # interrupted (or a worker broke): do not wait for answers in flight; the
            # rows already written stay, a rerun resumes. (3.11 has no terminate_workers())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            raise


def answer_on_ray(items, spec: AnswererSpec, workers: int, emit: Callable[[dict], None], address: str) -> None:
    from .ray import answer_on_ray as run

    run(items, spec, workers, emit, address)


def pick_runner(ray_address: str | None, workers: int) -> Callable:
    if ray_address:
        return lambda items, spec, n, emit: answer_on_ray(items, spec, n, emit, ray_address)
    return answer_here if workers == 1 else answer_in_pool


# ------------------------------------------------------------------- run ----
def run_batch(data, model, out, backend: str | None = None, ray_address: str | None = None, workers: int = 1,
              temperature: float = 0.0, seed: int | None = None, max_tokens: int | None = None,
              load_options: dict | None = None, limit: int | None = None, progress: bool = True) -> dict:
    """Answer every record of `data` not yet in `out`; returns counts
    {"records", "already_done", "answered", "errors"} and the output path."""
    from tqdm import tqdm

    from ..fsutil import ensure_writable_dir, require_regular_file

    items = load_batch_items(data, limit)
    if not items:
        raise HuatuoError(f"{data} holds no records to answer.")
    out = require_regular_file(out, "results file (--out)")
    ensure_writable_dir(out.parent)
    spec = AnswererSpec(str(model), backend, dict(load_options or {}), temperature, seed, max_tokens)
    check_run_info(out, spec.run_info(data))
    done = read_done(out, items)
    todo = [item for item in items if item.index not in done]
    errors, written_rows = [], []
    try:
        with open(out, "a", encoding="utf-8") as handle, \
                tqdm(total=len(items), initial=len(done), desc="batch", unit="rec", disable=not progress) as bar:
            def written(row):
                bar.update(1)
                written_rows.append(row["index"])
                if row.get("error"):
                    errors.append(row["index"])

            writer = OrderedWriter(handle, [item.index for item in todo], written)
            if todo:
                pick_runner(ray_address, workers)(todo, spec, workers, writer.add)
            handle.flush()
            os.fsync(handle.fileno())
        compact(out, items)
    except Interrupted as exc:
        kept = len(done) + len(written_rows) - len(errors)
        exc.detail = exc.detail or (f"{out} keeps {kept} of {len(items)} finished records; "
                                    "run the same command again to answer the rest")
        raise
    except OSError as exc:
        if not disk_full_error(exc):
            raise
        kept = len(done) + len(written_rows) - len(errors)
        raise HuatuoError(f"The disk holding {out} is full after {kept} of {len(items)} records; free some space "
                          "there and run the same command again to answer the rest.") from None
    return {"records": len(items), "already_done": len(done), "answered": len(todo) - len(errors),
            "errors": len(errors), "out": str(out)}
