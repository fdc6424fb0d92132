"""Write a (merged or trained) Qwen2.5-VL model as a full checkpoint in its SOURCE's layout.

The source folder's tensor names are kept ("visual.*" + "model.*" before transformers 4.52,
"model.visual.*" + "model.language_model.*" from 4.52; checkpoint.py's `layout`), every
tensor in the source's stored dtype (bf16 upstream), sharded safetensors + index, and every
other file of the source copied (config.json, preprocessor_config.json, generation_config.json,
tokenizer files, chat template), so `convert gguf` / `open_qwen25vl` take it like the original.
Shards, staging and copying are convert/checkpoint/writer.py's; only the names differ.
"""
from __future__ import annotations

import json
from pathlib import Path

from huatuo_lite.errors import ModelFormatError
from huatuo_lite.fsutil import staging_dir

from ..checkpoint.writer import (DEFAULT_SHARD_BYTES, INDEX_NAME, _copy_source_files, _remove_stale_weights,
                                 _shard_groups)
from .checkpoint import canonical_name
from .tiny import stored_name

# transformers 4.57's module names are the from-4.52 layout
MODULE_LAYOUT = "from-4.52"


def source_tensors(ckpt, model) -> dict:
    """{name as the source stores it: tensor in the source's dtype}, in the source's order;
    every source tensor must come from the model with the source's shape."""
    import torch

    state = {canonical_name(name, MODULE_LAYOUT): t for name, t in model.state_dict().items()}
    out = {}
    for name in ckpt.names():
        tensor = state.get(name)
        if tensor is None:
            raise ModelFormatError(f"The model to write lacks the tensor {name}, which {ckpt.root} holds.")
        if tuple(tensor.shape) != tuple(ckpt.shape(name)):
            raise ModelFormatError(f"Tensor {name} has shape {tuple(tensor.shape)} but {ckpt.root} stores "
                                   f"{tuple(ckpt.shape(name))}; it does not belong to this model.")
        out[stored_name(name, ckpt.layout)] = tensor.detach().to("cpu", getattr(torch, ckpt.dtype(name))).contiguous()
    return out


def write_qwen25vl(ckpt, model, out, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `model` (transformers' Qwen2_5_VLForConditionalGeneration, no adapter wrappers)
    shaped like the source `ckpt` (an open QwenCheckpoint) into `out`; returns out."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.resolve() == Path(ckpt.root).resolve():
        raise ModelFormatError(f"Refusing to overwrite the source model {ckpt.root}: choose another output folder.")
    groups = _shard_groups(source_tensors(ckpt, model), max_shard_bytes)
    with staging_dir(out) as stage:
        _copy_source_files(Path(ckpt.root), stage, ())
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
