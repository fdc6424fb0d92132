"""Writing a tiny checkpoint's files the way upstream's are written: bf16 safetensors shards
planned by size with their index, JSON files, and Qwen2's embedding row rounding. Shared by
the tiny makers of every family (tiny/make.py, qwen25vl/tiny.py)."""
from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def embedding_rows(tokenizer_size: int, multiple: int = 256) -> int:
    """Embedding rows strictly above the tokenizer size, like Qwen2 (152064 rows
    for 151646 tokens): the rows past the tokenizer are never produced by it."""
    return (tokenizer_size // multiple + 1) * multiple


def plan_shards(nbytes: dict, num_shards: int) -> list:
    """Consecutive groups of names of about equal bytes, in state-dict order (as
    transformers' save_pretrained does with max_shard_size). Planned from the sizes alone,
    before any tensor is drawn."""
    target = sum(nbytes.values()) / num_shards
    shards, current, size = [], [], 0
    for name, n in nbytes.items():
        if current and size + n > target and len(shards) < num_shards - 1:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    shards.append(current)
    return shards


def write_shards(root: Path, tensors, nbytes: dict, num_shards: int) -> None:
    """model-0000i-of-0000n.safetensors + model.safetensors.index.json. tensors: (name,
    tensor) pairs in nbytes' order, consumed lazily; each shard is saved and dropped before
    the next one is drawn."""
    from safetensors.torch import save_file

    plan = plan_shards(nbytes, max(2, num_shards))
    stream, weight_map = iter(tensors), {}
    for i, names in enumerate(plan, start=1):
        fname = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        shard = dict(next(stream) for _ in names)
        if list(shard) != names:       # the plan and the draw order come from the same spec
            raise RuntimeError(f"tiny shard {fname}: tensors arrived out of the planned order")
        save_file({k: v.contiguous() for k, v in shard.items()}, str(root / fname), metadata={"format": "pt"})
        del shard
        weight_map.update(dict.fromkeys(names, fname))
    write_json(root / "model.safetensors.index.json",
                {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": dict(sorted(weight_map.items()))})
