"""`huatuo-lite`: a click group whose default command is `ask`.

    huatuo-lite chest.png "Is there a pneumothorax?"          # = huatuo-lite ask ...
    huatuo-lite ask -m models/demo/gguf a.png b.png "Compare the two images."
    huatuo-lite convert gguf ./HuatuoGPT-Vision-7B ./hv7b-gguf --quant Q4_K_M

Every error is one sentence and a non-zero exit: usage errors 2, others 1,
Ctrl-C 130.
"""
from __future__ import annotations

import json
import os
import sys

import click

from . import __version__
from .backends import BACKEND_MODULES
from .errors import HuatuoError
from .family import DEMO_NOTICE, RESEARCH_NOTICE

EXIT_INTERRUPTED = 130


class DefaultGroup(click.Group):
    """A group that runs `default_command` when the first word names no command."""

    default_command = "ask"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HuatuoError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="huatuo-lite")
def cli():
    """Run HuatuoGPT-Vision offline. With no command, `ask` is run.

    \b
    Examples:
      huatuo-lite ask -m MODEL_DIR scan.png "What abnormality is seen?"
      huatuo-lite convert gguf UPSTREAM_DIR OUT_DIR --quant Q4_K_M
    """


def show_notice(quiet: bool) -> None:
    """The research-use notice, once per run, on stderr (upstream shows it too)."""
    if not quiet and not os.environ.get("HUATUO_LITE_NO_NOTICE"):
        click.echo(RESEARCH_NOTICE, err=True)


def read_image_arg(value: str):
    """`-` is an image read from stdin; anything else is a path."""
    return sys.stdin.buffer.read() if value == "-" else value


@cli.command()
@click.argument("args", nargs=-1, required=True, metavar="[IMAGE]... QUESTION")
@click.option("-a", "--attach", multiple=True, help="An image (repeatable); same as a positional IMAGE.")
@click.option("-m", "--model", "model", help="Model folder (upstream checkpoint or converted) or stored name.")
@click.option("-b", "--backend", type=click.Choice(sorted(BACKEND_MODULES)), help="Engine; default: the model folder's own.")
@click.option("--quant", help="Which quantization to load when a folder holds several (e.g. Q4_K_M).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: physical cores).")
@click.option("--gpu-layers", type=click.IntRange(-1), help="Layers offloaded to Metal/CUDA (GGUF; -1 = all).")
@click.option("--provider", "providers", multiple=True, help="onnxruntime execution provider: cpu, cuda, coreml (ONNX).")
@click.option("--temperature", type=click.FloatRange(0), help="0 = greedy. Upstream default 0.2.")
@click.option("--top-p", type=click.FloatRange(0, 1), help="Nucleus sampling mass (default 1.0 = off).")
@click.option("--top-k", type=click.IntRange(0), help="Top-k before sampling (HF default 50; 0 = off).")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), help="Upstream default 1.2; 1.0 turns it off.")
@click.option("--max-tokens", type=click.IntRange(1), help="Most new tokens (default 512).")
@click.option("--seed", type=int, help="Seed for sampling.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object: answer, token counts, timings.")
@click.option("-q", "--quiet", is_flag=True, help="Do not print the research-use notice.")
def ask(args, attach, model, backend, quant, threads, gpu_layers, providers, temperature, top_p, top_k,
        repetition_penalty, max_tokens, seed, as_json, quiet):
    """Answer QUESTION about the IMAGEs (at most 6; `-` reads one from stdin).

    \b
    Examples:
      huatuo-lite ask -m ./hv7b-gguf xray.png "Is there a fracture?"
      huatuo-lite ask -m ./hv7b-gguf --json --temperature 0 ct.png "Describe the lesion."
      cat scan.jpg | huatuo-lite ask -m ./hv7b-gguf - "Which organ is shown?"
    """
    from .api import load

    *images, question = args
    images = [read_image_arg(a) for a in [*images, *attach]]
    show_notice(quiet or as_json)
    options = {k: v for k, v in dict(quant=quant, threads=threads, gpu_layers=gpu_layers,
                                     providers=list(providers) or None).items() if v is not None}
    gen = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
               max_new_tokens=max_tokens, seed=seed)
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


def model_or_default(model):
    """The given model; else $HUATUO_LITE_MODEL, the one installed model, or the
    bundled demo model (said in one line); else a sentence on how to choose one."""
    from . import store

    choice = model or store.default_model()
    if choice is None:
        raise HuatuoError("No model given: pass --model with a model folder (see `huatuo-lite convert --help`).")
    if model is None and store.is_demo(choice):
        click.echo(DEMO_NOTICE, err=True)
    return choice


def _register_subcommands():
    from .cli_batch import batch
    from .cli_chat import chat
    from .cli_convert import convert
    from .cli_eval import eval_command
    from .cli_models import models
    from .cli_serve import serve
    from .cli_train import train

    for command in (chat, convert, models, eval_command, train, serve, batch):
        cli.add_command(command)


_register_subcommands()


def main() -> None:
    cli(prog_name="huatuo-lite")


if __name__ == "__main__":
    main()
