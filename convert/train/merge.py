"""Merge a LoRA/QLoRA adapter into its base: a full checkpoint in the upstream layout.

The base is always reloaded unquantized (a QLoRA adapter was trained against an
NF4 copy of these same weights; merging into NF4 would lose precision twice),
then `PeftModel.from_pretrained(...).merge_and_unload()` folds the LoRA deltas
(and a trained projector saved as a peft `modules_to_save`) into the weights,
and checkpoint_writer writes the source's own layout, names and dtype.
"""
from __future__ import annotations

from pathlib import Path

from huatuo_lite.errors import HuatuoError

from ..checkpoint.read import open_checkpoint
from ..checkpoint.writer import write_checkpoint
from huatuo_lite.jsonrecords import read_json_object

ADAPTER_CONFIG = "adapter_config.json"
LEFTOVER_MARKERS = ("lora_", "base_layer", "modules_to_save", "original_module")


def _check_adapter(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise HuatuoError(f"{adapter_dir} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); point at the "
                          "output folder of `huatuo-lite train --mode lora|qlora`.")
    return read_json_object(path, "train the adapter again")


def merged_model(adapter_dir, ckpt, dtype=None):
    """The base Llava (float32 unless dtype) with the adapter folded in (eval mode)."""
    import torch
    from peft import PeftModel

    from huatuo_lite.convert.reference.build import build_model

    base = build_model(ckpt, dtype or torch.float32)
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
    from .model import canonical_state

    adapter_dir = Path(adapter_dir).expanduser()
    _check_adapter(adapter_dir)
    ckpt = open_checkpoint(model)
    merged = merged_model(adapter_dir, ckpt)
    return write_checkpoint(ckpt, canonical_state(merged, ckpt), out)
