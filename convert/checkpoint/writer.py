"""Write a full checkpoint in the upstream layout of the source it came from.

Same config keys and tensor names as the source folder (the 7B/34B "llava"
names, or the -hf names in whichever -hf generation the source used), each
tensor in the source's stored dtype (bf16 upstream), sharded safetensors plus
model.safetensors.index.json, and every non-weight file of the source copied
(config.json, generation_config.json, tokenizer files, vit/, ...). So
`convert gguf|onnx` and `open_checkpoint` take the result unchanged.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

from huatuo_lite.errors import ModelFormatError
from huatuo_lite.fsutil import staging_dir

from .read import STORED_LAYOUTS, to_hf_name
from .files import find_weights

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3          # transformers' save_pretrained default ("5GB")
# weight files of the source, never copied: the writer makes its own
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
# what a training run leaves in a folder that may later be a source: never copied along
TRAINING_ARTIFACTS = ("checkpoints", "train_log.json", "adapter_config.json")


def stored_names(ckpt) -> dict:
    """canonical name -> the name the source folder stores it under."""
    stored = find_weights(ckpt.root)
    table = next((t for marker, (_, t) in STORED_LAYOUTS.items() if marker in stored), {})
    return {name: to_hf_name(name, table) if table else name for name in ckpt.names()}


def _source_files(root: Path) -> list:
    """Top-level files and folders of the source that are not its weights (nor hidden)."""
    weights = {p for pattern in WEIGHT_PATTERNS for p in root.glob(pattern)}
    return [p for p in sorted(root.iterdir()) if p not in weights and not p.name.startswith(".")]


def _copy_source_files(root: Path, stage: Path, skip: tuple) -> None:
    for item in _source_files(root):
        if item.name in skip or item.name in TRAINING_ARTIFACTS:
            continue
        if item.is_dir():
            shutil.copytree(item, stage / item.name)
        else:
            shutil.copy2(item, stage / item.name)


def _shard_groups(tensors: dict, max_bytes: int) -> list:
    """Consecutive groups, each under max_bytes unless one tensor alone is bigger."""
    groups, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            groups.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    return groups + [current] if current else groups


def _tensors_to_write(ckpt, tensors: Mapping) -> dict:
    """stored name -> tensor in the stored dtype, in the source's order; every
    source tensor must be given with its source shape."""
    import torch

    names = stored_names(ckpt)
    out = {}
    for canonical, stored in names.items():
        if canonical not in tensors:
            raise ModelFormatError(f"The model to write lacks the tensor {canonical}, which {ckpt.root} holds.")
        t = tensors[canonical]
        if tuple(t.shape) != tuple(ckpt.shape(canonical)):
            raise ModelFormatError(f"Tensor {canonical} has shape {tuple(t.shape)} but {ckpt.root} stores "
                                   f"{tuple(ckpt.shape(canonical))}; it does not belong to this model.")
        out[stored] = t.detach().to("cpu", getattr(torch, ckpt.dtype(canonical))).contiguous()
    return out


def write_checkpoint(ckpt, tensors: Mapping, out, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     skip_files: tuple = ()) -> Path:
    """Write `tensors` ({canonical name: tensor}) as a full model folder shaped like
    `ckpt` (an open source Checkpoint) into `out`; returns out. skip_files: names of
    source files/folders not to copy (e.g. a training log)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.resolve() == Path(ckpt.root).resolve():
        raise ModelFormatError(f"Refusing to overwrite the source model {ckpt.root}: choose another output folder.")
    stored = _tensors_to_write(ckpt, tensors)
    groups = _shard_groups(stored, max_shard_bytes)
    with staging_dir(out) as stage:
        _copy_source_files(Path(ckpt.root), stage, skip_files)
        weight_map, total = {}, 0
        for i, group in enumerate(groups, start=1):
            shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_file(group, str(stage / shard), metadata={"format": "pt"})
            weight_map.update((name, shard) for name in group)
            total += sum(t.numel() * t.element_size() for t in group.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (stage / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    _remove_stale_weights(out, keep={INDEX_NAME, *weight_map.values()})
    return out


def _remove_stale_weights(out: Path, keep: set) -> None:
    """Shards of an earlier write with another shard count would linger beside the new index."""
    for pattern in WEIGHT_PATTERNS:
        for old in out.glob(pattern):
            if old.name not in keep:
                old.unlink()
