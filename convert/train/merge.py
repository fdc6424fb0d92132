"""Merge a LoRA/QLoRA adapter into its base: a full checkpoint in the upstream layout.

The base is always reloaded unquantized (a QLoRA adapter was trained against an
NF4 copy of these same weights; merging into NF4 would lose precision twice),
then `PeftModel.from_pretrained(...).merge_and_unload()` folds the LoRA deltas
(and a trained projector saved as a peft `modules_to_save`) into the weights,
and checkpoint_writer writes the source's own layout, names and dtype.
The model is opened, built and written by its family's hooks (family.py).
"""
from __future__ import annotations

from pathlib import Path

from huatuo_lite.errors import HuatuoError

from huatuo_lite.jsonrecords import read_json_object

from .family import family_hooks

ADAPTER_CONFIG = "adapter_config.json"
TRAIN_LOG = "train_log.json"      # run.LOG_NAME: says which family the adapter was trained on
LEFTOVER_MARKERS = ("lora_", "base_layer", "modules_to_save", "original_module")


def _check_adapter(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise HuatuoError(f"{adapter_dir} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); point at the "
                          "output folder of `huatuo-lite train --mode lora|qlora`.")
    return read_json_object(path, "train the adapter again")


def _check_family(adapter_dir: Path, family: str, model) -> None:
    """An adapter our trainer wrote names its family in train_log.json (absent: llava);
    one trained on another family's model must not be folded in even where shapes agree."""
    path = adapter_dir / TRAIN_LOG
    if not path.is_file():
        return
    trained = read_json_object(path, "train the adapter again").get("family") or "llava"
    if trained != family:
        raise HuatuoError(f"The adapter {adapter_dir} was trained on a {trained}-family model, but {model} is a "
                          f"{family}-family model; merge it into the model it was trained on.")


def merged_model(adapter_dir, ckpt, dtype=None, build=None):
    """The base model (float32 unless dtype; built by `build`, default the LLaVA
    family's) with the adapter folded in (eval mode)."""
    import torch
    from peft import PeftModel

    if build is None:
        from huatuo_lite.convert.reference.build import build_model as build

    base = build(ckpt, dtype or torch.float32)
    try:
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (ValueError, KeyError, RuntimeError) as err:
        raise HuatuoError(f"The adapter {adapter_dir} does not fit the model {ckpt.root} "
                          f"({str(err).splitlines()[0]}); merge it into the model it was trained on.") from None
    merged = peft_model.merge_and_unload()
    leftover = [n for n in merged.state_dict() if any(m in n for m in LEFTOVER_MARKERS)]
    if leftover:   # would mean peft left a wrapper in place: never write such a folder
        raise HuatuoError(f"Merging left adapter tensors behind ({leftover[0]}); update peft and merge again.")
    return merged.eval()


def merge(adapter_dir, model, out) -> Path:
    """Write base `model` + adapter `adapter_dir` as a full upstream-layout folder `out`."""
    adapter_dir = Path(adapter_dir).expanduser()
    _check_adapter(adapter_dir)
    hooks = family_hooks(model)
    ckpt = hooks.open(model)
    _check_family(adapter_dir, hooks.name, model)
    merged = merged_model(adapter_dir, ckpt, build=hooks.build)
    return hooks.write_model(ckpt, merged, out)
