"""`huatuo-lite chat` on a pseudo-terminal: line editing, history, multi-line questions,
Ctrl-C and Ctrl-D, as a person at a terminal meets them (prompt_toolkit reader).

The bundled demo model answers the upstream lettered question with the option's letter
("A" = Yes for this image) and answers the first line alone with nothing, so the letter
shows that all the lines of a multi-line question reached the model.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")
pytest.importorskip("prompt_toolkit")

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo" / "gguf"
IMAGE = ROOT / "models" / "demo" / "eval" / "images" / "test_00000.png"   # an MRI with a lesion
PRESENCE = ["Is any lesion visible? \\", "A. Yes \\", "B. No \\",
            "Answer with the option's letter from the given choices directly."]
EDITOR_READY = re.escape("\x1b[?2004h")    # prompt_toolkit turns bracketed paste on at each prompt
ANSWER_STARTS = re.escape("\x1b[?2004l")   # ... and off when the question is sent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x08\r]")
UP, CTRL_D = "\x1b[A", "\x04"

# The demo model writes ~2000 tokens/s; this launcher slows each decode step and never
# stops at end-of-sequence, so an answer lasts MAX_TOKENS * STEP_S and a Ctrl-C lands in it.
STEP_S, MAX_TOKENS = 0.03, 100
SLOW_LAUNCHER = f"""
import time
from huatuo_lite.backends import gguf
from huatuo_lite.cli.main import main

step, init = gguf.GgufEngine.step, gguf.GgufEngine.__init__
def slow_step(self, token):
    time.sleep({STEP_S})
    return step(self, token)
def endless_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.eos_token_ids = frozenset()
gguf.GgufEngine.step, gguf.GgufEngine.__init__ = slow_step, endless_init
main()
"""


def spawn(home, *args, launcher=None):
    env = dict(os.environ, HUATUO_LITE_NO_NOTICE="1", HUATUO_LITE_HOME=str(home), TERM="xterm",
               PROMPT_TOOLKIT_NO_CPR="1")        # pexpect answers no cursor-position request
    command = [sys.executable, "-c", launcher] if launcher else [str(Path(sys.executable).parent / "huatuo-lite")]
    chat = pexpect.spawn(command[0], [*command[1:], "chat", "-m", str(DEMO), "--threads", "1", *args, str(IMAGE)],
                         env=env, encoding="utf-8", timeout=20, dimensions=(24, 120))
    chat.transcript = []
    chat.logfile_read = _Recorder(chat.transcript)
    chat.expect(EDITOR_READY)
    return chat


class _Recorder:
    """What the screen was sent, kept for the failure message and the transcript."""

    def __init__(self, parts):
        self.parts = parts

    def write(self, text):
        self.parts.append(text)

    def flush(self):
        pass


def screen(chat) -> str:
    return ANSI.sub("", "".join(chat.transcript))


def answer(chat) -> str:
    """The text printed between sending a question and the next prompt."""
    chat.expect(ANSWER_STARTS)
    chat.expect(EDITOR_READY)
    return ANSI.sub("", chat.before).strip()


def test_question_history_multiline_and_ctrl_d(tmp_path):
    chat = spawn(tmp_path, "--temperature", "0")
    chat.send(PRESENCE[0] + "\r")                   # the backslash keeps the question open
    chat.expect_exact("...")                        # ... and the editor shows a continuation line
    for line in PRESENCE[1:]:
        chat.send(line + "\r")
    assert answer(chat) == "A", screen(chat)

    chat.send("/reset\r")
    chat.expect_exact("(conversation cleared)")
    chat.send(f"/image {IMAGE}\r")
    chat.expect_exact("(image 1 attached")
    chat.send(PRESENCE[0].rstrip(" \\") + "\r")     # the first line alone: no options, no letter
    assert answer(chat) != "A", screen(chat)

    chat.send("/reset\r")
    chat.send(f"/image {IMAGE}\r")
    chat.expect_exact("(image 1 attached")
    chat.expect(EDITOR_READY)
    chat.send(UP * 6)                               # /image, /reset, the first line, /image, /reset,
                                                    # then the 4-line question
    chat.expect_exact(PRESENCE[-1])                 # recalled whole onto the screen
    chat.send("\r")
    assert answer(chat) == "A", screen(chat)

    chat.send("a draft")
    chat.sendintr()                                 # Ctrl-C on a line with text clears the line ...
    chat.send("/help\r")                            # ... so this is /help, not "a draft/help"
    chat.expect_exact("Ctrl-C stops the answer")
    chat.expect(EDITOR_READY)
    assert "Ctrl-C again" not in screen(chat)      # ... and does not count towards leaving

    chat.send(CTRL_D)
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0, screen(chat)
    history = (tmp_path / "chat_history").read_text(encoding="utf-8")
    assert "+" + "\n+".join(PRESENCE) in history    # one entry of four lines, as typed


def test_ctrl_c_cancels_the_answer_and_the_session_goes_on(tmp_path):
    home = tmp_path / "not-a-folder"
    home.write_text("a file where the store home should be")   # history cannot be kept here
    chat = spawn(home / "home", "--temperature", "0", "--max-tokens", str(MAX_TOKENS), launcher=SLOW_LAUNCHER)
    assert "cannot be written" in screen(chat) and "keeps no history" in screen(chat)

    chat.send("What imaging modality is shown in this image?\r")
    chat.expect(ANSWER_STARTS + "C")                # the answer is being written ...
    chat.sendintr()                                 # ... and Ctrl-C stops it
    chat.expect_exact("(answer cancelled")
    chat.expect(EDITOR_READY)

    chat.send("/help\r")                            # the session goes on: a command ...
    chat.expect_exact("Ctrl-C stops the answer")
    chat.expect(EDITOR_READY)
    chat.send("What imaging modality is shown in this image?\r")
    assert answer(chat).startswith("C"), screen(chat)   # ... and a whole answer

    chat.sendintr()                                 # Ctrl-C at the empty prompt: a hint,
    chat.expect_exact("Ctrl-C again or Ctrl-D to leave")
    chat.sendintr()                                 # a second one leaves
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 130, screen(chat)
    assert "Interrupted" in screen(chat)


def test_readline_when_prompt_toolkit_is_missing(tmp_path):
    hide = "import sys\nsys.modules['prompt_toolkit'] = None\nfrom huatuo_lite.cli.main import main\nmain()\n"
    env = dict(os.environ, HUATUO_LITE_NO_NOTICE="1", HUATUO_LITE_HOME=str(tmp_path), TERM="xterm")
    chat = pexpect.spawn(sys.executable, ["-c", hide, "chat", "-m", str(DEMO), "--threads", "1", "--temperature", "0",
                                          str(IMAGE)], env=env, encoding="utf-8", timeout=20)
    chat.expect_exact("> ")
    chat.send(PRESENCE[0] + "\r")
    for line in PRESENCE[1:]:
        chat.expect_exact("... ")
        chat.send(line + "\r")
    chat.expect_exact("> ")
    assert chat.before.strip().splitlines()[-1] == "A"
    chat.send("/reset\r")
    chat.expect_exact("> ")
    chat.send(UP + "\r")                            # readline recalls /reset
    chat.expect_exact("(conversation cleared)")
    chat.expect_exact("> ")
    chat.send(CTRL_D)
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    assert "/reset" in (tmp_path / "chat_history").read_text(encoding="utf-8")
