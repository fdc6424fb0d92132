"""How `huatuo-lite chat` reads a question: a line editor on a terminal, plain lines from a pipe.

Three readers, picked by `open_reader()`:
  * prompt_toolkit (stdin and stdout are terminals and it is installed): line editing,
    Up/Down history kept in a file, Alt-Enter / Esc-Enter inserts a newline;
  * readline (a terminal without prompt_toolkit): line editing and the same history file;
  * plain `input()` (stdin is a pipe or file): one line per question, as scripts expect.

In all three a line that ends in a backslash continues on the next line, so a
multi-line question (e.g. one with lettered options) can be typed or piped.

`read()` returns the question's text, raises EOFError at Ctrl-D / end of input and
KeyboardInterrupt at Ctrl-C on an empty prompt (Ctrl-C on a line with text clears it).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PROMPT, MORE = "> ", "... "
CONTINUE = "\\"
HISTORY_FILE = "chat_history"          # under store.home()


def join_continued(text: str) -> str:
    """Drop the backslash that ended a continued line: 'a \\\\\\nb' -> 'a \\nb'."""
    return "\n".join(line.rstrip()[:-1] if _continues(line) else line for line in text.split("\n"))


def _continues(line: str) -> bool:
    return line.rstrip().endswith(CONTINUE)


def history_path(enabled: bool = True):
    """The history file under the store home, or None (and why) when it cannot be written."""
    if not enabled:
        return None, None
    from ..store import home

    path = home() / HISTORY_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # 0o600: questions may hold patient details; only the owner reads them.
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        with open(path, "rb"):
            pass
    except OSError as exc:
        return None, f"{path} cannot be written ({exc.strerror or exc}); this session keeps no history."
    return path, None


class LineReader:
    """Plain `input()`: for pipes and files (and terminals without an editor)."""

    def read(self) -> str:
        lines = [input(PROMPT)]
        while _continues(lines[-1]):
            try:
                lines.append(input(MORE))
            except EOFError:            # input ended inside a continued question: ask what we have
                break
        return join_continued("\n".join(lines))


class ReadlineReader(LineReader):
    """`input()` with GNU readline's editing; history appended to `path` after each question."""

    def __init__(self, path: Path | None):
        import readline

        self.readline, self.path = readline, path
        if path is not None:
            try:
                readline.read_history_file(path)
            except OSError:
                pass

    def read(self) -> str:
        text = super().read()
        if self.path is not None:
            try:
                self.readline.append_history_file(1, self.path)   # readline keeps each line as one entry
            except OSError:
                self.path = None
        return text


def prompt_toolkit_reader(path: Path | None):
    """A prompt_toolkit session: Enter sends, unless the line ends in a backslash."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    class QuietFileHistory(FileHistory):
        """A history file that stops being written, instead of failing the prompt, when the disk does."""

        def load_history_strings(self):
            try:
                return list(super().load_history_strings())
            except OSError:
                return []

        def store_string(self, string: str) -> None:
            try:
                super().store_string(string)
            except OSError:
                pass

    keys = KeyBindings()

    # c-j too: Enter typed while an answer was printing reaches the editor as \n
    # (the terminal was in cooked mode, ICRNL), and it should send, not add a line.
    @keys.add("enter")
    @keys.add("c-j")
    def _enter(event):
        buffer = event.current_buffer
        if buffer.document.is_cursor_at_the_end and _continues(buffer.text):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @keys.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    @keys.add("c-c")
    def _interrupt(event):
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    history = QuietFileHistory(str(path)) if path is not None else InMemoryHistory()
    session = PromptSession(history=history, multiline=True, key_bindings=keys,
                            prompt_continuation=lambda width, line, wrap: MORE)

    class Reader:
        def read(self) -> str:
            return join_continued(session.prompt(PROMPT))

    return Reader()


def interactive() -> bool:
    """Whether a person is typing (stdin is a terminal)."""
    return sys.stdin.isatty()


def open_reader(keep_history: bool = True):
    """(reader, note): the best reader for this stdin/stdout; note says why history is off, if it is."""
    if not interactive():
        return LineReader(), None
    path, note = history_path(keep_history)
    if sys.stdout.isatty():
        try:
            return prompt_toolkit_reader(path), note
        except ImportError:
            pass
    try:
        return ReadlineReader(path), note
    except ImportError:                 # e.g. Windows without pyreadline
        return LineReader(), note
