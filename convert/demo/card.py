"""MODEL_CARD.md of the shipped demo model: convert/demo/card.md with its blanks filled
from what the build measured (sizes, parameter count, training log, the eval report)."""
from __future__ import annotations

import json
import math
from pathlib import Path

TEMPLATE = Path(__file__).with_name("card.md")


def _parameters(checkpoint: Path) -> int:
    from safetensors import safe_open

    total = 0
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(shard), "np") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


def _sizes(checkpoint: Path) -> str:
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config", config)
    vision = config["vision_config"] if "vision_config" in config else None
    parts = [f"text hidden {text['hidden_size']}, intermediate {text['intermediate_size']}, "
             f"{text['num_hidden_layers']} layers, {text['num_attention_heads']} heads "
             f"({text['num_key_value_heads']} KV heads), vocabulary rows {text['vocab_size']}"]
    if vision:
        parts.append(f"vision hidden {vision['hidden_size']}, intermediate {vision['intermediate_size']}, "
                     f"{vision['num_hidden_layers']} layers, {vision['num_attention_heads']} heads")
    return "; ".join(parts)


def _results(report: dict) -> str:
    rows = ["| subset | questions | accuracy |", "|---|---:|---:|"]
    for name, sub in sorted(report["subsets"].items()):
        rows.append(f"| {name} | {sub['count']} | {100 * sub['accuracy']:.1f}% |")
    total = report["total"]
    rows.append(f"| **all** | {total['count']} | **{100 * total['accuracy']:.1f}%** |")
    return "\n".join(rows)


def fill_card(checkpoint, train_log: dict, report: dict, demo_args: str) -> str:
    """The card text. train_log: the training run's train_log.json; report: evaluate's
    report of the reference model on the test split."""
    checkpoint = Path(checkpoint)
    losses = train_log["losses"]
    tail = losses[-20:]
    training = (f"{train_log['steps']} optimizer steps of {train_log['options']['batch_size']} examples "
                f"({train_log['n_examples']} examples), lr {train_log['options']['lr']} "
                f"{train_log['options']['schedule']}, {train_log['seconds'] / 60:.0f} min on this machine's CPU; "
                f"mean loss of the last 20 steps {sum(tail) / len(tail):.3f}")
    blanks = {"__SIZES__": _sizes(checkpoint), "__PARAMS__": f"{_parameters(checkpoint) / 1e6:.1f} M",
              "__TEST__": f"{report['total']['count']} questions",
              "__TRAINING__": training, "__DEMO_ARGS__": demo_args, "__RESULTS__": _results(report),
              "__CHANCE__": f"{100 * report['total']['chance']:.1f}%"}
    text = TEMPLATE.read_text(encoding="utf-8")
    for blank, value in blanks.items():
        text = text.replace(blank, value)
    return text
