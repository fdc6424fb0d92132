"""SIGINT, SIGTERM and SIGHUP end a command the same way: an exception that
unwinds through every `finally:` (so staging folders are removed), then one
sentence and exit 130 / 143 / 129 (128 + the signal's number, as shells do).

    install()                         # once, by the CLI's main()
    with deferred():                  # the final renames of an output: never half-done
        ...
    with reporting(out_dir, "manifest.json"):   # the sentence says whether out_dir was completed
        export(...)

Without install() (library use) SIGTERM/SIGHUP keep their default action
(the process dies; the next run into the folder removes its staging, see
fsutil.py) and Ctrl-C raises the usual KeyboardInterrupt.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

# signal -> (name in the sentence, exit code)
SIGNALS = {signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143), signal.SIGHUP: ("SIGHUP", 129)}


class Interrupted(KeyboardInterrupt):
    """A signal asked this run to stop. `detail` (set on the way out) says what
    was left behind: "OUT was completed before it; it is whole"."""

    def __init__(self, signum: int = signal.SIGINT, detail: str | None = None):
        super().__init__(SIGNALS.get(signum, (f"signal {signum}", 128 + signum))[0])
        self.signum, self.detail = signum, detail

    @property
    def exit_code(self) -> int:
        return SIGNALS.get(self.signum, ("", 128 + self.signum))[1]

    def sentence(self) -> str:
        name = SIGNALS.get(self.signum, (f"signal {self.signum}",))[0]
        return f"Interrupted by {name}" + (f"; {self.detail}." if self.detail else ".")


_pending: list[int] = []      # signals that arrived inside deferred(), replayed at its end
_deferring = 0


def _handler(signum, frame):
    if _deferring:
        _pending.append(signum)
        return
    raise Interrupted(signum)


def install() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into Interrupted (main thread only)."""
    for signum in SIGNALS:
        signal.signal(signum, _handler)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends, then act on the first
    one that came. Used around the few renames that put a finished output in
    place (milliseconds), so an output is either the old one or the new one."""
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield                                     # signals are only handled in the main thread anyway
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, _handler)
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        for signum, old in previous.items():
            signal.signal(signum, old)
        if not _deferring and _pending:
            signum = _pending[0]
            _pending.clear()
            _replay(signum, previous[signum])


def _replay(signum: int, old) -> None:
    """Act on a held signal as the handler in place before deferred() would have."""
    if old is _handler:
        raise Interrupted(signum)
    if callable(old):
        old(signum, None)
    elif old == signal.SIG_DFL:
        os.kill(os.getpid(), signum)              # default action (SIGINT's default raises KeyboardInterrupt)


def _identity(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@contextlib.contextmanager
def reporting(out_dir, marker: str, otherwise: str | None = None):
    """On an interruption, say whether `out_dir` was completed: its `marker` file
    (written last, e.g. manifest.json) is new. Otherwise say `otherwise` (default:
    nothing was written)."""
    out_dir = Path(out_dir)
    before = _identity(out_dir / marker)
    try:
        yield
    except Interrupted as exc:
        if exc.detail is None:
            after = _identity(out_dir / marker)
            exc.detail = (f"{out_dir} was completed just before it and is whole" if after and after != before
                          else otherwise or f"nothing was written to {out_dir} (its partial files were removed)")
        raise
