"""`huatuo-lite eval`: upstream's medical VQA protocol on one model, or a
fidelity comparison of several converted forms of it (--compare)."""
from __future__ import annotations

from pathlib import Path

import click

from ..backends import BACKEND_MODULES
from .types import MAX_TOKENS, SEED, TEMPERATURE
from ..families.common import EVAL_MAX_NEW_TOKENS


@click.command(name="eval")
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("-m", "--model", "model", required=True, help="Model folder or stored name (the reference for --compare).")
@click.option("-b", "--backend", type=click.Choice(sorted(BACKEND_MODULES)), help="Engine; default: the model folder's own.")
@click.option("--quant", help="Which quantization to load when a folder holds several (e.g. Q4_K_M).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads.")
@click.option("--gpu-layers", type=click.IntRange(-1), help="Layers offloaded to Metal/CUDA (GGUF; -1 = all).")
@click.option("--limit", type=click.IntRange(1), help="Evaluate only the first N closed questions.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              help="Report folder (resumed if it exists). Default: eval-<data name>-<model name>/.")
@click.option("--compare", help="Comma-separated specs: reference,gguf:Q8_0,gguf:Q4_K_M,onnx:int8,onnx:int4 "
                                "(SPEC=PATH names a folder).")
@click.option("--compare-root", type=click.Path(file_okay=False),
              help="Where --compare looks for converted folders (default: the folder holding --model).")
@click.option("--temperature", type=TEMPERATURE, default=0.0, show_default=True,
              help="0 = greedy; upstream eval samples at 0.2 (use with --seed).")
@click.option("--seed", type=SEED, help="Seed for sampling (0 or more).")
@click.option("--max-tokens", type=MAX_TOKENS, default=EVAL_MAX_NEW_TOKENS, show_default=True,
              help="Most new tokens per answer (the scorer reads the first letter only).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def eval_command(data, model, backend, quant, threads, gpu_layers, limit, out_dir, compare, compare_root,
                 temperature, seed, max_tokens, no_progress):
    """Score MODEL on DATA, an upstream-format eval JSON beside its images/ folder.

    \b
    Examples:
      huatuo-lite eval Medical_Multimodal_Evaluation_Data/medical_multimodel_evaluation_data.json -m ./hv7b-gguf
      huatuo-lite eval test_vqa.json -m ./HuatuoGPT-Vision-7B --compare reference,gguf:Q8_0,onnx:int8
    """
    from ..eval.report import render_markdown

    out = Path(out_dir) if out_dir else Path(f"eval-{Path(data).stem}-{Path(model).name or 'model'}")
    gen = dict(temperature=temperature, seed=seed, max_new_tokens=max_tokens)
    if compare:
        from ..eval.fidelity import FIDELITY_CARD, compare as run_compare, parse_specs

        specs = parse_specs(compare, model, compare_root)
        run_compare(specs, data, out, limit=limit, progress=not no_progress, threads=threads, **gen)
        click.echo((out / FIDELITY_CARD).read_text(encoding="utf-8"))
        return
    from ..eval.run import run_eval

    options = {k: v for k, v in dict(quant=quant, threads=threads, gpu_layers=gpu_layers).items() if v is not None}
    report = run_eval(model, data, out, backend=backend, limit=limit, progress=not no_progress,
                      load_options=options, **gen)
    click.echo(render_markdown(report))
    click.echo(f"Reports: {out / 'report.md'}, {out / 'report.json'}", err=True)
