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

from .family import family_hooks, folder_family

ADAPTER_CONFIG = "adapter_config.json"
TRAIN_LOG = "train_log.json"      # run.LOG_NAME: says which family the adapter was trained on
LEFTOVER_MARKERS = ("lora_", "base_layer", "modules_to_save", "original_module")


def _check_adapter(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise HuatuoError(f"{adapter_dir} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); point at the "
                          "output folder of `huatuo-lite train --mode lora|qlora`.")
    return read_json_object(path, "train the adapter again")


def _trained_family(adapter_dir: Path, config: dict) -> str | None:
    """The family the adapter was trained on: our train_log.json's (absent key: llava), else
    that of the base folder adapter_config.json names, when it still exists; else unknown."""
    path = adapter_dir / TRAIN_LOG
    if path.is_file():
        return read_json_object(path, "train the adapter again").get("family") or "llava"
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and base and (Path(base).expanduser() / "config.json").is_file():
        return folder_family(base)
    return None


def _check_family(adapter_dir: Path, config: dict, family: str, model) -> None:
    """An adapter trained on another family's model must not be folded in even where its
    LoRA names and shapes happen to fit (both families name the text layers alike)."""
    trained = _trained_family(adapter_dir, config)
    if trained is not None and trained != family:
        raise HuatuoError(f"The adapter {adapter_dir} was trained on a {trained}-family model, but {model} is a "
                          f"{family}-family model; merge it into the model it was trained on.")


def _first_reason(err: Exception) -> str:
    """peft's first informative line: torch's load_state_dict error opens with a header line
    ("Error(s) in loading state_dict for PeftModel:") and gives the reasons below it."""
    lines = [line.strip().rstrip(".") for line in str(err).splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    return (reasons or lines or [type(err).__name__])[0]


def merged_model(adapter_dir, ckpt, dtype=None, build=None):
    """The base model (float32 unless dtype; built by `build`, default the LLaVA
    family's) with the adapter folded in (eval mode)."""
    import torch
    from peft import PeftModel

    if build is None:
        from huatuo_lite.convert.reference.build import build_model as build

    base = build(ckpt, dtype or torch.float32)
    config = read_json_object(Path(adapter_dir) / ADAPTER_CONFIG, "train the adapter again")
    names = [name for name, _ in base.named_modules()]
    absent = next((m for m in config.get("modules_to_save") or [] if isinstance(m, str) and
                   not any(n == m or n.endswith("." + m) for n in names)), None)
    if absent is not None:   # peft would skip it silently: the trained module would be lost
        raise HuatuoError(f"The adapter {adapter_dir} trains the module {absent}, which the model {ckpt.root} "
                          "does not have; merge it into the model it was trained on.")
    try:
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (ValueError, KeyError, RuntimeError) as err:
        raise HuatuoError(f"The adapter {adapter_dir} does not fit the model {ckpt.root} "
                          f"({_first_reason(err)}); merge it into the model it was trained on.") from None
    merged = peft_model.merge_and_unload()
    leftover = [n for n in merged.state_dict() if any(m in n for m in LEFTOVER_MARKERS)]
    if leftover:   # would mean peft left a wrapper in place: never write such a folder
        raise HuatuoError(f"Merging left adapter tensors behind ({leftover[0]}); update peft and merge again.")
    return merged.eval()


def merge(adapter_dir, model, out) -> Path:
    """Write base `model` + adapter `adapter_dir` as a full upstream-layout folder `out`."""
    adapter_dir = Path(adapter_dir).expanduser()
    config = _check_adapter(adapter_dir)
    hooks = family_hooks(model)
    ckpt = hooks.open(model)
    _check_family(adapter_dir, config, hooks.name, model)
    merged = merged_model(adapter_dir, ckpt, build=hooks.build)
    return hooks.write_model(ckpt, merged, out)
