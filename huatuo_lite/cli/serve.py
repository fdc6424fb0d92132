"""`huatuo-lite serve`: the OpenAI-compatible server on one model (needs the `serve` extra)."""
from __future__ import annotations

import os
from dataclasses import replace

import click

from ..backends import BACKEND_MODULES
from ..backends.gguf_llama import HUGEPAGES_ENV
from ..errors import HuatuoError
from ..server.policy import (DEFAULT_HOST, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_MESSAGES, DEFAULT_MAX_QUEUE,
                     DEFAULT_PORT, LOOPBACK_HOSTS)

MIB = 1024 * 1024


@click.command()
@click.option("-m", "--model", "model", required=True, help="Model folder or stored name.")
@click.option("-b", "--backend", type=click.Choice(sorted(BACKEND_MODULES)), help="Engine; default: the model folder's own.")
@click.option("--quant", help="Which quantization to load when a folder holds several (e.g. Q4_K_M).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads.")
@click.option("--gpu-layers", type=click.IntRange(-1), help="Layers offloaded to Metal/CUDA (GGUF; -1 = all).")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to bind; keep loopback unless you set --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--api-key", envvar="HUATUO_LITE_API_KEY", help="Require 'Authorization: Bearer KEY' (or set HUATUO_LITE_API_KEY).")
@click.option("--allow-dir", "allow_dirs", multiple=True, type=click.Path(file_okay=False),
              help="A folder whose images requests may name by path (repeatable); otherwise data URIs only.")
@click.option("--allow-host", "allow_hosts", multiple=True,
              help="Another host name clients may call this server by (repeatable); requests with any other "
                   "Host header are refused, so a web page cannot reach the server through DNS rebinding.")
@click.option("--model-id", help="The id /v1/models announces (default: the model's name and quant, e.g. "
                                 "HuatuoGPT-Vision-7B-Q4_K_M); requests may send any `model`.")
@click.option("--max-body-mb", type=click.FloatRange(0.001), default=DEFAULT_MAX_BODY_BYTES / MIB, show_default=True,
              help="Largest request body.")
@click.option("--max-messages", type=click.IntRange(1), default=DEFAULT_MAX_MESSAGES, show_default=True)
@click.option("--max-queue", type=click.IntRange(1), default=DEFAULT_MAX_QUEUE, show_default=True,
              help="Requests admitted at once (one runs, the rest wait); more get 503.")
@click.option("-q", "--quiet", is_flag=True, help="Do not print the research-use notice.")
def serve(model, backend, quant, threads, gpu_layers, host, port, api_key, allow_dirs, allow_hosts, model_id,
          max_body_mb, max_messages, max_queue, quiet):
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health).

    \b
    Examples:
      huatuo-lite serve -m ./hv7b-gguf
      huatuo-lite serve -m ./hv7b-gguf --port 9000 --api-key s3cret --allow-dir ./scans
      curl http://127.0.0.1:8080/v1/models
    """
    from ..api import load
    from .common import show_notice
    from ..model_name import model_name
    from ..server.policy import ServerSettings
    from ..server.run import serve as run_server

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise HuatuoError("The server needs FastAPI and uvicorn: pip install 'huatuo-lite[serve]'.") from None
    if host not in LOOPBACK_HOSTS and not api_key:
        click.echo(f"Warning: serving on {host} without --api-key: anyone who can reach it may use the model.",
                   err=True)
    # checked before the (slow) model load: a wrong --allow-dir fails at once
    settings = ServerSettings(model_id=model_id or "", api_key=api_key, allow_dirs=tuple(allow_dirs),
                              bind_host=host, allow_hosts=tuple(allow_hosts), max_body_bytes=int(max_body_mb * MIB),
                              max_messages=max_messages, max_queue=max_queue)
    show_notice(quiet)
    options = {k: v for k, v in dict(quant=quant, threads=threads, gpu_layers=gpu_layers).items() if v is not None}
    # a server lives long enough to win back huge pages' slower load (llama.cpp's repacked weights
    # on 2 MiB pages: 7B Q4_K_M decode 1.05x stock against 0.95x, load +5 s; bench/decode_pages.py);
    # HUATUO_LITE_HUGEPAGES=0 in the environment still turns it off
    os.environ.setdefault(HUGEPAGES_ENV, "1")
    with load(model, backend=backend, **options) as hv:
        settings = replace(settings, model_id=model_id or model_name(hv))
        click.echo(f"Serving {settings.model_id} ({hv.backend}) on http://{host}:{port}/v1", err=True)
        run_server(hv, settings, host=host, port=port)
