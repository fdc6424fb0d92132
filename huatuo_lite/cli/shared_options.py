"""The model and sampling options that `ask` and `chat` share, defined once.

    @click.command()
    @model_options
    @sampling_options
    def ask(..., model, backend, quant, threads, gpu_layers, providers, n_ctx,
            temperature, top_p, top_k, repetition_penalty, max_tokens, seed): ...

`engine_options()` and `generation_options()` turn those parameters into the
keyword arguments of `api.load()` and of a generation (None = the default).
"""
from __future__ import annotations

import click

from ..backends import BACKEND_MODULES
from ..families import FAMILIES
from .types import MAX_TOKENS, REPETITION_PENALTY, SEED, TEMPERATURE, TOP_K, TOP_P

# Listed in --help order; `_stack` applies them bottom-up so click keeps this order.
MODEL_OPTIONS = (
    click.option("-m", "--model", "model", help="Model folder (upstream checkpoint or converted) or stored name."),
    click.option("-b", "--backend", type=click.Choice(sorted(BACKEND_MODULES)),
                 help="Engine; default: the model folder's own."),
    click.option("--quant", help="Which quantization to load when a folder holds several (e.g. Q4_K_M)."),
    click.option("--threads", type=click.IntRange(1), help="CPU threads (default: physical cores)."),
    click.option("--gpu-layers", type=click.IntRange(-1), help="Layers offloaded to Metal/CUDA (GGUF; -1 = all)."),
    click.option("--provider", "providers", multiple=True,
                 help="onnxruntime execution provider: cpu, cuda, coreml (ONNX)."),
    click.option("--n-ctx", "n_ctx", type=click.IntRange(64),
                 help="Context length in tokens (GGUF; default: the model's, at most 4096 for the LLaVA family, "
                      "8192 for Qwen2.5-VL, whose large images take more tokens)."),
)


def model_default(option: str) -> str:
    """An unset sampling option takes the model's own value (its checkpoint's generation
    config, else its family's): say each family's, e.g. 'llava 0.2, qwen25vl 0.1'."""
    return ", ".join(f"{name} {getattr(module.GENERATION_DEFAULTS, option)}" for name, module in FAMILIES.items())


# The types check values with GenerationConfig's own rules (cli/types.py): nan, -1 -> exit 2.
SAMPLING_OPTIONS = (
    click.option("--temperature", type=TEMPERATURE,
                 help=f"0 = greedy. Default: the model's own ({model_default('temperature')})."),
    click.option("--top-p", type=TOP_P, help=f"Nucleus sampling mass, 0 to 1; 1.0 = off. Default: the model's "
                                             f"own ({model_default('top_p')})."),
    click.option("--top-k", type=TOP_K, help=f"Top-k before sampling; 0 = off. Default: the model's own "
                                             f"({model_default('top_k')})."),
    click.option("--repetition-penalty", type=REPETITION_PENALTY,
                 help=f"1.0 turns it off. Default: the model's own ({model_default('repetition_penalty')})."),
    click.option("--max-tokens", type=MAX_TOKENS,
                 help=f"Most new tokens. Default: the model's own ({model_default('max_new_tokens')})."),
    click.option("--seed", type=SEED, help="Seed for sampling (0 or more)."),
)

quiet_option = click.option("-q", "--quiet", is_flag=True, help="Do not print the research-use notice.")


def _stack(options):
    def apply(function):
        for option in reversed(options):
            function = option(function)
        return function
    return apply


model_options = _stack(MODEL_OPTIONS)
sampling_options = _stack(SAMPLING_OPTIONS)


def engine_options(quant=None, threads=None, gpu_layers=None, providers=(), n_ctx=None) -> dict:
    """`api.load()` keywords for the options given (left-out ones keep the engine's default)."""
    given = dict(quant=quant, threads=threads, gpu_layers=gpu_layers, providers=list(providers) or None,
                 n_ctx=n_ctx)
    return {key: value for key, value in given.items() if value is not None}


def generation_options(temperature=None, top_p=None, top_k=None, repetition_penalty=None,
                       max_tokens=None, seed=None) -> dict:
    """Generation keywords (None = the model's default)."""
    return dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                max_new_tokens=max_tokens, seed=seed)
