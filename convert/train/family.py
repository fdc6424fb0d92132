"""Which family's training hooks a model folder takes: one table keyed by family.

run.py's loop (optimizer, schedule, accumulation, checkpoints, logs) and merge.py are
the same for every family; what differs is how the folder is opened, how records become
token ids and labels, how a batch's loss is computed, and how a full model is written
back in the source's layout. Each family gives those as a FamilyHooks row, found by name
(importlib) so that no family module is imported unless its folder is trained.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ..checkpoint.family import folder_family


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


def family_hooks(model) -> FamilyHooks:
    module, attribute = HOOKS[folder_family(model)]
    return getattr(importlib.import_module(module), attribute)
