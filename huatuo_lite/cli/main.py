"""`huatuo-lite`: a click group whose default command is `ask`.

    huatuo-lite chest.png "Is there a pneumothorax?"          # = huatuo-lite ask ...
    huatuo-lite ask -m models/demo/gguf a.png b.png "Compare the two images."
    huatuo-lite convert gguf ./HuatuoGPT-Vision-7B ./hv7b-gguf --quant Q4_K_M

Every error is one sentence and a non-zero exit: usage errors 2, others 1,
Ctrl-C 130, SIGTERM 143, SIGHUP 129 (huatuo_lite/interrupt.py); warnings are one
line on stderr, without Python's file:line prefix.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import click

from .. import __version__
from .shared_options import engine_options, generation_options, model_options, quiet_option, sampling_options
from ..errors import HuatuoError
from .common import model_or_default, show_notice

# a first word like this that is no file is a mistyped command, not an image or a question
COMMAND_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,39}")


class DefaultGroup(click.Group):
    """A group that runs `default_command` when the first word names no command."""

    default_command = "ask"
    own_options = ("-v", "--verbose", "-q", "--quiet", "--no-cache")   # the group's flags, before any command

    def parse_args(self, ctx, args):
        lead = 0
        while lead < len(args) and args[lead] in self.own_options:
            lead += 1
        if lead < len(args) and self._is_default_command_input(ctx, args[lead]):
            args = [*args[:lead], self.default_command, *args[lead:]]
        return super().parse_args(ctx, args)

    def _is_default_command_input(self, ctx, word: str) -> bool:
        """`huatuo-lite IMAGE QUESTION` runs ask; a word that looks like a command
        name and is no file (`huatuo-lite frobnicate`) is a mistyped command, refused
        before any model loads."""
        if word in self.commands or word in ("--help", "-h", "--version"):
            return False
        if word.startswith("-") or not COMMAND_LIKE.fullmatch(word) or names_a_file(word):
            return True
        if ctx.resilient_parsing:        # shell completion of a half-typed command name
            return False
        ctx.fail(f"No such command {word!r}: use one of {', '.join(sorted(self.commands))}, "
                 "or give an image and a question (huatuo-lite IMAGE QUESTION).")

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HuatuoError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt as exc:
            from ..interrupt import Interrupted

            stop = exc if isinstance(exc, Interrupted) else Interrupted()
            click.echo("\n" + stop.sentence(), err=True)
            raise click.exceptions.Exit(stop.exit_code) from None


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="huatuo-lite")
@click.option("-v", "--verbose", is_flag=True, help="Show INFO logs on stderr, llama.cpp's own log included.")
@click.option("-q", "--quiet", is_flag=True, help="Hide the research-use notice and progress bars.")
@click.option("--no-cache", is_flag=True,
              help="Neither read nor write the disk cache of image features and prompt prefixes "
                   "(same as HUATUO_LITE_NO_CACHE=1; see `huatuo-lite models cache info`).")
def cli(verbose, quiet, no_cache):
    """Run HuatuoGPT-Vision offline. With no command, `ask` is run.

    \b
    Examples:
      huatuo-lite ask -m MODEL_DIR scan.png "What abnormality is seen?"
      huatuo-lite convert gguf UPSTREAM_DIR OUT_DIR --quant Q4_K_M
      huatuo-lite --no-cache ask scan.png "..."   # no disk cache
    \b
    Shell completion (bash; zsh/fish: zsh_source/fish_source):
      eval "$(_HUATUO_LITE_COMPLETE=bash_source huatuo-lite)"
    """
    set_verbosity(verbose, quiet)
    if no_cache:      # an environment variable, so batch/eval/serve workers follow too
        os.environ["HUATUO_LITE_NO_CACHE"] = "1"


def set_verbosity(verbose: bool, quiet: bool) -> None:
    """-v: INFO logs (ours and llama.cpp's, whose engine reads HUATUO_LITE_VERBOSE);
    -q: no notice (HUATUO_LITE_NO_NOTICE) and no progress bars (tqdm reads TQDM_DISABLE).
    Environment variables, so worker processes (batch, eval) follow too."""
    if verbose:
        os.environ["HUATUO_LITE_VERBOSE"] = "1"
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
        logging.getLogger("llama-cpp-python").setLevel(logging.INFO)
    if quiet:
        os.environ["HUATUO_LITE_NO_NOTICE"] = "1"
        os.environ["TQDM_DISABLE"] = "1"


def names_a_file(text: str) -> bool:
    """Whether an argument is an existing file (a long question is no file name: the OS refuses it)."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def read_image_arg(value: str):
    """`-` is an image read from stdin; anything else is a path."""
    return sys.stdin.buffer.read() if value == "-" else value


@cli.command()
@click.argument("args", nargs=-1, required=True, metavar="[IMAGE]... QUESTION")
@click.option("-a", "--attach", multiple=True, help="An image (repeatable); same as a positional IMAGE.")
@model_options
@sampling_options
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON object: answer, token counts, usage, timings; errors as {\"error\": ...}.")
@quiet_option
def ask(args, attach, model, backend, quant, threads, gpu_layers, providers, n_ctx, temperature, top_p, top_k,
        repetition_penalty, max_tokens, seed, as_json, quiet):
    """Answer QUESTION about the IMAGEs (at most 6; `-` reads one from stdin).

    \b
    Examples:
      huatuo-lite ask -m ./hv7b-gguf xray.png "Is there a fracture?"
      huatuo-lite ask -m ./hv7b-gguf --json --temperature 0 ct.png "Describe the lesion."
      cat scan.jpg | huatuo-lite ask -m ./hv7b-gguf - "Which organ is shown?"
    """
    *images, question = args
    if question == "-" or names_a_file(question):
        raise click.UsageError(f"{question!r} is a file, and there is no question after it: add the "
                               f"question as the last argument, e.g. huatuo-lite ask {question} \"What is shown?\".")
    try:
        answer_question(images, attach, question, model, backend, as_json, quiet,
                        engine_options(quant, threads, gpu_layers, providers, n_ctx),
                        generation_options(temperature, top_p, top_k, repetition_penalty, max_tokens, seed))
    except HuatuoError as exc:
        if as_json:      # stdout stays one JSON object; the sentence and exit code are as without --json
            click.echo(json.dumps(error_object(exc), ensure_ascii=False, indent=2))
        raise


def answer_question(images, attach, question, model, backend, as_json, quiet, options, gen):
    from .. import prompt
    from ..api import load

    # refuse a bad question (empty, not UTF-8, too many images) before loading a model
    prompt.validate([prompt.Turn(question=question, n_images=len(images) + len(attach))])
    images = [read_image_arg(a) for a in [*images, *attach]]
    show_notice(quiet or as_json)
    with load(model_or_default(model), backend=backend, **options) as hv, hv.lock:
        generation = hv.generation(images, question, **gen)
        stream = sys.stdout.isatty() and not as_json
        for piece in generation:
            if stream:
                click.echo(piece, nl=False)
        answer = generation.answer
        if as_json:
            click.echo(json.dumps({**answer.to_dict(), "model": str(hv.path), "backend": hv.backend}, ensure_ascii=False, indent=2))
        else:
            click.echo("" if stream else answer.text)


def error_object(exc: HuatuoError) -> dict:
    """An OpenAI-style error body, with the server's `code` for our error classes."""
    from ..server.policy import HUATUO_ERROR_CODES

    code = next(c for kind, c in HUATUO_ERROR_CODES.items() if isinstance(exc, kind))
    return {"error": {"message": str(exc), "type": "invalid_request_error", "code": code}}


def _register_subcommands():
    from .batch import batch
    from .chat import chat
    from .convert import convert
    from .eval import eval_command
    from .models import models
    from .serve import serve
    from .train import train

    for command in (chat, convert, models, eval_command, train, serve, batch):
        cli.add_command(command)


_register_subcommands()


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings meant for the user (e.g. --threads clamped) as one sentence, not
    Python's `file:line: UserWarning:` form."""
    click.echo(f"Warning: {message}", err=True)


def main() -> None:
    import warnings

    from ..interrupt import install

    install()       # SIGTERM/SIGHUP unwind like Ctrl-C: staging removed, exit 143/129
    warnings.showwarning = one_line_warning
    cli(prog_name="huatuo-lite")


if __name__ == "__main__":
    main()
