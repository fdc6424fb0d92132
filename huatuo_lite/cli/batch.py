"""`huatuo-lite batch`: a whole eval or PubMedVision dataset into a resumable JSONL file."""
from __future__ import annotations

import json

import click

from ..backends import BACKEND_MODULES
from .types import MAX_TOKENS, SEED, TEMPERATURE
from ..errors import HuatuoError


@click.command()
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("-m", "--model", "model", required=True, help="Model folder or stored name (on every worker).")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Results JSONL; an existing one is resumed (its finished records are skipped).")
@click.option("-b", "--backend", type=click.Choice(sorted(BACKEND_MODULES)), help="Engine; default: the model folder's own.")
@click.option("--quant", help="Which quantization to load when a folder holds several (e.g. Q4_K_M).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads per worker.")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Run on Ray Data: 'local' starts Ray here; else a cluster address ('auto', 'ray://head:10001').")
@click.option("-w", "--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Workers, each with its own model: local processes, or Ray actors with --ray.")
@click.option("--temperature", type=TEMPERATURE, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=SEED, help="Seed for sampling (0 or more).")
@click.option("--max-tokens", type=MAX_TOKENS,
              help="Most new tokens per answer (default: eval's budget for eval records, the model's own otherwise).")
@click.option("--limit", type=click.IntRange(1), help="Only the first N records.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def batch(data, model, out, backend, quant, threads, ray_address, workers, temperature, seed, max_tokens, limit,
          no_progress):
    """Answer every record of DATA (upstream eval JSON or PubMedVision JSON) into OUT, one JSON line each.

    Exit 0 when every record was answered; 1 when any failed (a missing image, a
    prompt too long: the row holds the error, the summary is still printed).

    \b
    Examples:
      huatuo-lite batch test_vqa.json -m ./hv7b-gguf -o results.jsonl --workers 2
      huatuo-lite batch pubmedvision.json -m ./hv7b-gguf -o out.jsonl --ray auto --workers 8
    """
    from ..batch.run import run_batch

    options = {k: v for k, v in dict(quant=quant, threads=threads).items() if v is not None}
    summary = run_batch(data, model, out, backend=backend, ray_address=ray_address, workers=workers,
                        temperature=temperature, seed=seed, max_tokens=max_tokens, load_options=options,
                        limit=limit, progress=not no_progress)
    click.echo(json.dumps(summary))
    if summary["errors"]:       # the file is complete (failed rows hold their error); the exit says not all answered
        raise HuatuoError(f"{summary['errors']} of {summary['records']} records failed; their rows in {out} "
                          "give the reason (run the same command again to retry them).")
