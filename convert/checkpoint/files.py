"""The weight files of a model folder: which ones, their tensor headers, and
loading tensors from them lazily (safetensors are memory-mapped by safe_open).

Sources, first match wins: model.safetensors.index.json (+ shards),
model.safetensors, and -- only with allow_pickle -- pytorch_model.bin.index.json
(+ shards) or pytorch_model.bin. Pickle can run arbitrary code when loaded; we
load it with weights_only=True and still refuse it by default.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Iterator

from huatuo_lite.errors import ModelFormatError

# safetensors header dtype -> torch dtype name (what Checkpoint.dtype() returns)
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                      "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
PICKLE_NAMES = ("pytorch_model.bin.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class TensorEntry:
    path: Path          # the file holding the tensor
    stored: str         # its name in that file
    shape: tuple
    dtype: str          # torch dtype name, e.g. "bfloat16"
    kind: str           # "safetensors" or "pickle"


# ---------------------------------------------------------------- headers ----
def _safetensors_entry(f, path: Path, name: str) -> TensorEntry:
    view = f.get_slice(name)              # header only: no tensor data is read
    dtype = view.get_dtype()
    return TensorEntry(path, name, tuple(view.get_shape()),
                       SAFETENSORS_DTYPES.get(dtype, dtype.lower()), "safetensors")


def _safetensors_header(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: _safetensors_entry(f, path, name) for name in f.keys()}
    except Exception as err:   # safetensors raises its own error types for bad headers
        raise ModelFormatError(f"{path} is not a readable safetensors file ({err}); re-download it.") from None


def _load_pickle(path: Path) -> dict:
    """{name: tensor} from a pickle, loaded weights-only; one sentence for a file
    that is not one (torch's own errors are paragraphs)."""
    import pickle

    import torch

    try:
        with warnings.catch_warnings():     # torch warns about the pickle protocol before refusing
            warnings.simplefilter("ignore")
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:       # old (non-zip) pickle format cannot be memory-mapped
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise ModelFormatError(f"{path} holds objects other than tensors ({found[1]}), which weights-only "
                                   "loading refuses; convert it to safetensors where you trust it.") from None
        raise ModelFormatError(f"{path} is not a PyTorch weights file (unreadable pickle); "
                               "re-download it or convert it to safetensors.") from None
    except Exception as err:
        reason = str(err).strip().splitlines()[0].rstrip(".")[:160] if str(err).strip() else type(err).__name__
        raise ModelFormatError(f"{path} is not a loadable PyTorch weights file ({reason}); "
                               "re-download it or convert it to safetensors.") from None
    problem = _not_a_state_dict(state, torch.Tensor)
    if problem:
        raise ModelFormatError(f"{path} is not a flat name -> tensor state dict (it holds {problem}); "
                               "save the model's state_dict() to safetensors and convert that.")
    return state


def _not_a_state_dict(state, tensor_type) -> str | None:
    """What a loaded pickle holds instead of {name: tensor}, or None if it is one."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__} object"
    odd = next((v for v in state.values() if not isinstance(v, tensor_type)), None)
    if odd is not None or any(not isinstance(k, str) for k in state):
        return f"a value of type {type(odd).__name__}" if odd is not None else "keys that are not texts"
    return None


def _pickle_header(path: Path) -> dict:
    state = _load_pickle(path)
    return {name: TensorEntry(path, name, tuple(t.shape), str(t.dtype).removeprefix("torch."), "pickle")
            for name, t in state.items()}


HEADER_READERS = {".safetensors": _safetensors_header, ".bin": _pickle_header}


def _header(path: Path) -> dict:
    return HEADER_READERS[path.suffix](path)


# ---------------------------------------------------------------- sources ----
def _from_index(root: Path, index_name: str) -> dict:
    """stored name -> entry for every tensor the index lists, shard by shard."""
    index_path = root / index_name
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelFormatError(f"{index_path} is not a valid index (no weight_map: {err}); re-download it.") from None
    entries = {}
    for shard in sorted(set(weight_map.values())):
        if not (root / shard).is_file():
            raise ModelFormatError(f"{root}: the shard {shard} listed in {index_name} is missing; "
                                   "the download is incomplete, fetch that file again.")
        header = _header(root / shard)
        names = [n for n, s in weight_map.items() if s == shard]
        absent = [n for n in names if n not in header]
        if absent:
            raise ModelFormatError(f"{root}: {index_name} puts {absent[0]} in {shard} but that shard does "
                                   "not hold it; the index and the shards do not match, re-download them.")
        entries.update((n, header[n]) for n in names)
    return entries


def _from_file(root: Path, name: str) -> dict:
    return _header(root / name)


WEIGHT_SOURCES = (  # (file that must exist, reader, is pickle)
    ("model.safetensors.index.json", _from_index, False),
    ("model.safetensors", _from_file, False),
    ("pytorch_model.bin.index.json", _from_index, True),
    ("pytorch_model.bin", _from_file, True),
)


def find_weights(root: Path, allow_pickle: bool = False) -> dict:
    """stored name -> TensorEntry, ordered shard by shard; ModelFormatError if none."""
    for name, reader, is_pickle in WEIGHT_SOURCES:
        if not (root / name).is_file():
            continue
        if is_pickle and not allow_pickle:
            raise ModelFormatError(f"{root} holds only a pickle checkpoint ({name}), which can run code when "
                                   "loaded; convert it to safetensors, or pass --allow-pickle if you trust it.")
        entries = reader(root, name)
        order = {path: i for i, path in enumerate(dict.fromkeys(e.path for e in entries.values()))}
        return dict(sorted(entries.items(), key=lambda kv: order[kv[1].path]))
    raise ModelFormatError(f"{root} holds no weights: expected model.safetensors.index.json with its "
                           "shards, or model.safetensors.")


# ---------------------------------------------------------------- tensors ----
def load_tensor(entry: TensorEntry):
    """One tensor in its stored dtype."""
    if entry.kind == "pickle":
        return _load_pickle(entry.path)[entry.stored]
    from safetensors import safe_open

    with safe_open(str(entry.path), framework="pt") as f:
        return f.get_tensor(entry.stored)


def _iter_safetensors(path: Path, items: list) -> Iterator:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name, entry in items:
            yield name, f.get_tensor(entry.stored)


def _iter_pickle(path: Path, items: list) -> Iterator:
    state = _load_pickle(path)
    for name, entry in items:
        yield name, state[entry.stored]
    del state


FILE_ITERATORS = {"safetensors": _iter_safetensors, "pickle": _iter_pickle}


def iter_file_tensors(entries: dict) -> Iterator:
    """(name, tensor) for entries {name: TensorEntry}, one file open at a time.
    entries must be grouped by file (find_weights orders them so)."""
    for path, group in groupby(entries.items(), key=lambda kv: kv[1].path):
        items = list(group)
        yield from FILE_ITERATORS[items[0][1].kind](path, items)


class TensorStore:
    """Named tensors of a checkpoint folder, read lazily: the part every family's checkpoint
    object shares. `_entries`: canonical name -> TensorEntry, in file order; `root`: the folder."""

    root: Path
    _entries: dict

    def names(self) -> list[str]:
        return list(self._entries)

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of {self.root}") from None

    def shape(self, name: str) -> tuple:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        return self._entry(name).dtype

    def get(self, name: str):
        return load_tensor(self._entry(name))

    def iter_tensors(self, prefix: str = "") -> Iterator:
        """(name, tensor) for every tensor whose name starts with prefix, shard by shard."""
        return iter_file_tensors({n: e for n, e in self._entries.items() if n.startswith(prefix)})
