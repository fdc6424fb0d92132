"""SIGINT, SIGTERM and SIGHUP end a command the same way: an exception that
unwinds through every `finally:` (so staging folders are removed), then one
sentence and exit 130 / 143 / 129 (128 + the signal's number, as shells do).

    install()                         # once, by the CLI's main()
    with deferred():                  # the final renames of an output: never half-done
        ...
    with reporting(out_dir, "manifest.json"):   # the sentence says whether out_dir was completed
        export(...)

A signal that arrives while the main thread is inside a long native call (a 7B image encode
took 49 s; a 512-token prefill batch tens of seconds) cannot raise until the call returns: a
watchdog thread, woken by the signal itself (signal.set_wakeup_fd), then says the sentence and
ends the process with the same exit code after GRACE_S, unless the main thread has begun to
handle it or holds it in deferred(). Nothing is half-written by that: outputs are renamed into
place inside deferred(), and a staging folder left behind is removed by the next run (fsutil.py).

Without install() (library use) SIGTERM/SIGHUP keep their default action
(the process dies; the next run into the folder removes its staging, see
fsutil.py) and Ctrl-C raises the usual KeyboardInterrupt.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
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
_handled = [0]                # signals the main thread's handler has seen (the watchdog reads it)
GRACE_S = 3.0                 # how long the watchdog waits for the main thread to act on a signal
_watching: list = []          # the watchdog is started once per process


def _handler(signum, frame):
    _handled[0] += 1
    if _deferring:
        _pending.append(signum)
        return
    raise Interrupted(signum)


def install() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into Interrupted (main thread only), with the watchdog
    for signals that arrive during a long native call."""
    for signum in SIGNALS:
        signal.signal(signum, _handler)
    if _watching:
        return
    _watching.append(True)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watchdog, args=(read_fd,), name="signal-watchdog", daemon=True).start()


def _watchdog(read_fd: int) -> None:
    """Wake on each signal; if the main thread has not run its handler within GRACE_S (it is
    inside native code) and holds no deferred() block, end the process as the handler would."""
    while True:
        try:
            data = os.read(read_fd, 1)
        except OSError:
            return
        if not data or data[0] not in SIGNALS:
            continue
        signum, seen = data[0], _handled[0]
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and _handled[0] == seen:
            time.sleep(0.05)
        if _handled[0] == seen and not _deferring:
            exc = Interrupted(signum)
            sys.stderr.write(f"\n{exc.sentence()}\n")       # as cli/main.py says it
            sys.stderr.flush()
            os._exit(exc.exit_code)


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
