"""Which family's training hooks a model folder takes: one table keyed by family.

run.py's loop (optimizer, schedule, accumulation, checkpoints, logs) and merge.py are
the same for every family; what differs is how the folder is opened, how records become
token ids and labels, how a batch's loss is computed, and how a full model is written
back in the source's layout. Each family gives those as a FamilyHooks row, found by name
(importlib) so that no family module is imported unless its folder is trained.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from huatuo_lite.families import DEFAULT, FAMILY_BY_VARIANT, VARIANT_BY_ARCHITECTURE


@dataclass(frozen=True)
class FamilyHooks:
    name: str                  # families.FAMILIES key
    open: Callable             # model folder -> checkpoint (one sentence if unusable)
    examples: Callable         # (data, ckpt, TrainOptions) -> (train, validation, problems)
    start: Callable            # (ckpt, mode, TrainOptions) -> (net, model, loss); loss(batch) -> (loss, n)
    build: Callable            # (ckpt, torch dtype) -> the transformers model, unquantized (merge)
    write_model: Callable      # (ckpt, model, out) -> out: a full checkpoint in the source's layout
    modes: tuple               # training modes offered
    train_projector: bool      # lora/qlora default when the user says neither --train/--freeze-projector


# family -> (module, attribute) of its hooks
HOOKS = {
    "llava": ("huatuo_lite.convert.train.run", "LLAVA_HOOKS"),
    "qwen25vl": ("huatuo_lite.convert.qwen25vl.train", "HOOKS"),
}


def folder_family(model) -> str:
    """The family config.json's architecture belongs to; the LLaVA family when the file
    is unreadable or names no known architecture (its reader then says what is wrong)."""
    try:
        config = json.loads((Path(model).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return DEFAULT
    archs = config.get("architectures") if isinstance(config, dict) else None
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    variant = next((VARIANT_BY_ARCHITECTURE[a] for a in archs if a in VARIANT_BY_ARCHITECTURE), None)
    return FAMILY_BY_VARIANT[variant.name] if variant else DEFAULT


def family_hooks(model) -> FamilyHooks:
    module, attribute = HOOKS[folder_family(model)]
    return getattr(importlib.import_module(module), attribute)
