"""`huatuo-lite chat`: an interactive multi-turn session on a terminal.

On a terminal Ctrl-C cancels the answer being generated (the turn is dropped, the
session goes on); Ctrl-C at the empty prompt twice in a row, or Ctrl-D, leaves.
From a pipe the session reads one question per line and Ctrl-C ends it (exit 130),
as before, so scripts behave the same.
"""
from __future__ import annotations

import signal

import click

from .chat_input import HISTORY_FILE, interactive, open_reader
from .shared_options import engine_options, generation_options, model_options, quiet_option, sampling_options
from ..errors import HuatuoError

GREETING = "Type a question; /help lists commands and keys; Ctrl-D leaves."
HELP = f"""\
Commands: /image PATH (attach to the next question), /reset (forget the conversation), /help, /quit.
Anything else is a question about the attached images.
A line ending in \\ continues the question on the next line (for lettered options);
in a terminal Alt-Enter or Esc-Enter also starts a new line. Up/Down recall earlier
questions, kept in {HISTORY_FILE} under $HUATUO_LITE_HOME (default ~/.cache/huatuo-lite)
unless --no-history.
Ctrl-C stops the answer being written; Ctrl-C twice at an empty prompt, or Ctrl-D, leaves."""


@click.command(epilog=HELP.replace("\n", " "))
@click.argument("images", nargs=-1)
@model_options
@sampling_options
@click.option("--no-history", is_flag=True, help=f"Keep no question history (default: {HISTORY_FILE} under $HUATUO_LITE_HOME).")
@quiet_option
def chat(images, model, backend, quant, threads, gpu_layers, providers, n_ctx, temperature, top_p, top_k,
         repetition_penalty, max_tokens, seed, no_history, quiet):
    """Talk about IMAGEs over several turns (upstream's history format).

    \b
    Examples:
      huatuo-lite chat -m ./hv7b-gguf chest.png
      > What is shown?
      > /image followup.png
      > Has it changed?
      > Is any lesion visible? \\
      ... A. Yes \\
      ... B. No
    """
    from ..api import load
    from .common import model_or_default, show_notice

    show_notice(quiet)
    gen = generation_options(temperature, top_p, top_k, repetition_penalty, max_tokens, seed)
    options = engine_options(quant, threads, gpu_layers, providers, n_ctx)
    with load(model_or_default(model), backend=backend, **options) as hv:
        session = hv.chat()
        for image in images:
            session.add_image(image)
        reader, note = open_reader(keep_history=not no_history)
        if note:
            click.echo(note, err=True)
        click.echo(GREETING, err=True)
        run_loop(session, gen, reader, cancel_answers=interactive())


def run_loop(session, gen, reader, cancel_answers: bool = False) -> None:
    """Read questions until /quit, Ctrl-D or end of input; errors in one turn do not end the chat.

    cancel_answers: a Ctrl-C during an answer drops that answer and goes back to the prompt
    (on a terminal); otherwise Ctrl-C ends the session (the CLI exits 130)."""
    armed = False               # the last key was a Ctrl-C: one more at the empty prompt leaves
    while True:
        try:
            text = reader.read().strip()
        except EOFError:
            return
        except KeyboardInterrupt as exc:
            if armed or not (cancel_answers and _is_ctrl_c(exc)):
                raise
            armed = True
            click.echo("(Ctrl-C again or Ctrl-D to leave)", err=True)
            continue
        armed = False
        if not text:
            continue
        try:
            if one_turn(session, text, gen) is STOP:
                return
        except HuatuoError as exc:
            click.echo(f"Error: {exc}", err=True)
        except KeyboardInterrupt as exc:
            if not (cancel_answers and _is_ctrl_c(exc)):
                raise
            armed = True
            click.echo(f"\n{_cancelled(session)}", err=True)


def one_turn(session, text: str, gen):
    """Run a /command, or answer a question while streaming it to stdout."""
    command, _, arg = text.partition(" ")
    handler = COMMANDS.get(command)
    if handler:
        return handler(session, arg.strip())
    pieces = session.stream(text, **gen)
    try:
        for piece in pieces:
            click.echo(piece, nl=False)
    finally:
        pieces.close()          # a Ctrl-C between pieces: release the model lock now, not at GC
    click.echo()


def _is_ctrl_c(exc) -> bool:
    """A Ctrl-C, not SIGTERM/SIGHUP (the CLI's handler raises those as KeyboardInterrupt with .signum)."""
    return getattr(exc, "signum", signal.SIGINT) == signal.SIGINT


def _cancelled(session) -> str:
    kept = len(session.pending_images)
    images = f"; the {kept} attached image(s) stay for the next question" if kept else ""
    return f"(answer cancelled{images}; Ctrl-C again or Ctrl-D to leave)"


STOP = object()


def _image(session, arg):
    if not arg:
        raise HuatuoError("Give a path: /image PATH.")
    session.add_image(arg)
    click.echo(f"(image {len(session.images) + len(session.pending_images)} attached to the next question)", err=True)


def _reset(session, _arg):
    session.reset()
    click.echo("(conversation cleared)", err=True)


def _help(_session, _arg):
    click.echo(HELP, err=True)


COMMANDS = {"/image": _image, "/reset": _reset, "/help": _help,
            "/quit": lambda s, a: STOP, "/exit": lambda s, a: STOP}
