"""`huatuo-lite chat`: an interactive multi-turn session on a terminal."""
from __future__ import annotations

import click

from .errors import HuatuoError

HELP = "Commands: /image PATH (attach to the next question), /reset, /quit. Anything else is a question."


@click.command()
@click.argument("images", nargs=-1)
@click.option("-m", "--model", "model", help="Model folder or stored name.")
@click.option("-b", "--backend", help="Engine; default: the model folder's own.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads.")
@click.option("--temperature", type=click.FloatRange(0), help="0 = greedy. Upstream default 0.2.")
@click.option("--max-tokens", type=click.IntRange(1), help="Most new tokens per answer (default 512).")
@click.option("--seed", type=int, help="Seed for sampling.")
@click.option("-q", "--quiet", is_flag=True, help="Do not print the research-use notice.")
def chat(images, model, backend, threads, temperature, max_tokens, seed, quiet):
    """Talk about IMAGEs over several turns (upstream's history format).

    \b
    Examples:
      huatuo-lite chat -m ./hv7b-gguf chest.png
      > What is shown?
      > /image followup.png
      > Has it changed?
    """
    from .api import load
    from .cli import model_or_default, show_notice

    show_notice(quiet)
    options = {"threads": threads} if threads else {}
    gen = dict(temperature=temperature, max_new_tokens=max_tokens, seed=seed)
    with load(model_or_default(model), backend=backend, **options) as hv:
        session = hv.chat()
        for image in images:
            session.add_image(image)
        click.echo(HELP, err=True)
        run_loop(session, gen)


def run_loop(session, gen) -> None:
    """Read lines until /quit or end of input; errors in one turn do not end the chat."""
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return
        if not line:
            continue
        command, _, arg = line.partition(" ")
        handler = COMMANDS.get(command)
        try:
            if handler:
                if handler(session, arg.strip()) is STOP:
                    return
            else:
                for piece in session.stream(line, **gen):
                    click.echo(piece, nl=False)
                click.echo()
        except HuatuoError as exc:
            click.echo(f"Error: {exc}", err=True)


STOP = object()


def _image(session, arg):
    if not arg:
        raise HuatuoError("Give a path: /image PATH.")
    session.add_image(arg)
    click.echo(f"(image {len(session.images) + len(session.pending_images)} attached to the next question)", err=True)


def _reset(session, _arg):
    session.reset()
    click.echo("(conversation cleared)", err=True)


COMMANDS = {"/image": _image, "/reset": _reset, "/quit": lambda s, a: STOP, "/exit": lambda s, a: STOP}
