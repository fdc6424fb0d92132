"""`huatuo-lite train DATA.json --model SRC --out DIR --mode ...` and `huatuo-lite train merge`.

Needs the `train` extra (torch, transformers, peft; bitsandbytes for qlora).
Imports of huatuo_lite.convert happen inside the commands, so `huatuo-lite ask`
never loads torch."""
from __future__ import annotations

import importlib

import click

from ..errors import HuatuoError
from ..interrupt import reporting

TRAIN_EXTRA_HINT = "install the training tools with `pip install 'huatuo-lite[train]'` (torch first, see README)"
MODES = ("align", "lora", "qlora", "full")
SCHEDULES = ("cosine", "linear", "constant")


def train_module(name: str):
    """huatuo_lite.convert.<name>, or one sentence saying how to install it."""
    try:
        return importlib.import_module(f"huatuo_lite.convert.{name}")
    except ImportError as exc:
        raise HuatuoError(f"Training needs {exc.name or 'extra packages'}: {TRAIN_EXTRA_HINT}.") from None


class TrainGroup(click.Group):
    """`train DATA ...` runs the `run` subcommand; `train merge ...` merges."""

    default_command = "run"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@click.group(cls=TrainGroup)
def train():
    """Fine-tune on PubMedVision-format data (align, lora, qlora, full; Qwen2.5-VL models: lora,
    qlora), or merge an adapter.

    \b
    Examples:
      huatuo-lite train data.json --model ./HuatuoGPT-Vision-7B --out ./my-lora --mode lora
      huatuo-lite train merge ./my-lora --model ./HuatuoGPT-Vision-7B --out ./my-model
    """


@train.command("run")
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--model", "model", required=True, type=click.Path(file_okay=False), help="Upstream model folder to train.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder (adapter or full model).")
@click.option("--mode", type=click.Choice(MODES), default="lora", show_default=True,
              help="align: projector only; lora/qlora: LoRA on the language model (qlora: 4-bit base); full: everything.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate (default per mode: align 1e-3, lora 2e-4, full 2e-5).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="cosine", show_default=True)
@click.option("--warmup-ratio", type=click.FloatRange(0, 1), default=0.03, show_default=True)
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--max-steps", type=click.IntRange(1), help="Optimizer steps (wins over --epochs).")
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True)
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations to save memory.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-length", type=click.IntRange(1), help="Longest example in positions (default 4096).")
@click.option("--image-root", type=click.Path(file_okay=False), help="Folder the image paths are relative to (default: DATA's folder).")
@click.option("--val-split", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Fraction of records held out for a validation loss.")
@click.option("--val-every", type=click.IntRange(1), help="Steps between validation losses.")
@click.option("--save-every", type=click.IntRange(1), help="Steps between resumable checkpoints (OUT/checkpoints).")
@click.option("--resume", "resume", is_flag=True, help="Continue from the newest checkpoint in OUT.")
@click.option("--resume-from", type=click.Path(file_okay=False), help="Continue from this checkpoint folder.")
@click.option("--lora-r", type=click.IntRange(1), default=16, show_default=True)
@click.option("--lora-alpha", type=click.IntRange(1), default=32, show_default=True)
@click.option("--lora-dropout", type=click.FloatRange(0, 1), default=0.05, show_default=True)
@click.option("--train-projector/--freeze-projector", "train_projector", default=None,
              help="lora/qlora: whether the projector (Qwen2.5-VL: the merger) trains fully too "
                   "(default: LLaVA yes, Qwen2.5-VL no).")
@click.option("--bad-records", type=click.Choice(["refuse", "skip"]), default="refuse", show_default=True,
              help="What to do with an unusable record (missing image, empty conversation, too many images).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads for torch (default: torch's choice).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_run(data, model, out, mode, resume, resume_from, threads, no_progress, **options):
    """Train MODEL on DATA (PubMedVision JSON: `image` list + `conversations`).

    \b
    Example:
      huatuo-lite train data.json --model ./HuatuoGPT-Vision-7B --out ./my-lora --mode qlora --lr 2e-4
    """
    recipe = train_module("train.run")
    if threads:
        import torch

        torch.set_num_threads(threads)
    kept = (f"no trained model was written to {out} (partial files were removed; checkpoints saved with "
            "--save-every are kept for --resume)")
    with reporting(out, recipe.LOG_NAME, otherwise=kept):
        result = recipe.train(data, model, out, mode=mode, resume=resume_from or resume,
                              progress=not no_progress, **options)
    for problem in result.skipped:
        click.echo(f"Skipped {problem.sentence()}.", err=True)
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    click.echo(f"Trained {result.steps} steps on {result.n_examples} examples: loss {last}{val}.", err=True)
    click.echo(str(result.adapter_dir or result.model_dir))


@train.command("merge")
@click.argument("adapter", type=click.Path(file_okay=False))
@click.option("--model", "model", required=True, type=click.Path(file_okay=False), help="The base model the adapter was trained on.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder for the merged full model.")
def train_merge(adapter, model, out):
    """Fold a LoRA/QLoRA ADAPTER into MODEL: a full checkpoint in the upstream layout.

    \b
    Example:
      huatuo-lite train merge ./my-lora --model ./HuatuoGPT-Vision-7B --out ./my-model
    """
    with reporting(out, "model.safetensors.index.json"):
        click.echo(str(train_module("train.merge").merge(adapter, model, out)))
