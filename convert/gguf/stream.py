"""Write a GGUF file tensor by tensor, so the whole model is never in memory.

GGUFWriter wants every tensor before it writes the data section. We plan the
tensor table from shapes alone (names, shapes, ggml types -> byte sizes and
offsets), write header + metadata + table with GGUFWriter, and then write each
tensor's bytes at its offset as the checkpoint yields it, in whatever order the
shards come. Each tensor arrives in its stored dtype (a torch tensor) and is
encoded a block of rows at a time, so peak memory is one stored tensor plus a
~64 MB float32 block and its encoding: a 7B's bf16 embedding table (1.1 GB) no
longer costs its float32 copy and the encoder's temporaries (4.3 GB measured).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from huatuo_lite.errors import ModelFormatError

Q = GGMLQuantizationType
ENCODE_BLOCK_BYTES = 64 << 20   # float32 bytes per block of rows handed to the encoder


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the output: GGUF name, torch-order shape, ggml type."""

    name: str
    shape: tuple
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * type_size


def weight_qtype(shape: tuple, wanted: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type a tensor is stored in: vectors (norms, biases) stay F32, block
    types need rows divisible by their block (else F16, as convert_hf_to_gguf)."""
    if len(shape) < 2:
        return Q.F32
    block, _ = GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else Q.F16


def encode(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 array -> the bytes of its ggml encoding (gguf package's own code)."""
    return np.ascontiguousarray(quantize(np.ascontiguousarray(array, dtype=np.float32), qtype))


def row_blocks(tensor, block_bytes: int = ENCODE_BLOCK_BYTES) -> Iterator[np.ndarray]:
    """A torch tensor of any float dtype as float32 numpy blocks of whole rows
    ([rows, last dim]; ggml encodes each row on its own, so the blocks' encodings
    laid end to end are the whole tensor's)."""
    rows = tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() > 1 else tensor.reshape(1, -1)
    step = max(1, block_bytes // (4 * rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        yield rows[start:start + step].float().numpy()


def write_streaming_gguf(path: Path, arch: str, add_metadata: Callable[[GGUFWriter], None],
                         plan: list[PlannedTensor], arrays: Iterable[tuple[str, object]],
                         desc: str = "GGUF") -> Path:
    """Write `path`: metadata via add_metadata(writer), then the tensors of `plan`,
    whose values come from `arrays` as (gguf_name, torch tensor in any float dtype)
    in any order."""
    writer = GGUFWriter(path, arch)
    add_metadata(writer)
    for t in plan:
        # tensor_dtype is ignored when raw_dtype is given; shape is torch order
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    align = writer.data_alignment
    data_start = GGUFWriter.ggml_pad(fout.tell(), align)
    offsets, end = _offsets(plan, align)
    try:
        _write_data(fout, data_start, offsets, {t.name: t for t in plan}, arrays, desc)
        fout.truncate(data_start + end)   # trailing padding of the last tensor
    finally:
        writer.close()
    return path


def _offsets(plan: list[PlannedTensor], align: int) -> tuple[dict, int]:
    """Offsets inside the data section, in table order (as GGUFWriter writes them)."""
    offsets, cursor = {}, 0
    for t in plan:
        offsets[t.name] = cursor
        cursor += GGUFWriter.ggml_pad(t.nbytes, align)
    return offsets, cursor


def _write_data(fout, data_start: int, offsets: dict, planned: dict,
                arrays: Iterable[tuple[str, object]], desc: str) -> None:
    from tqdm import tqdm

    done = set()
    total = sum(t.nbytes for t in planned.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
        for name, array in arrays:
            t = planned[name]
            if tuple(array.shape) != tuple(t.shape):
                raise ModelFormatError(f"Tensor {name} has shape {tuple(array.shape)} but the config "
                                       f"implies {t.shape}; the checkpoint does not match its config.json.")
            fout.seek(data_start + offsets[name])
            written = 0
            for block in row_blocks(array):
                data = encode(block, t.qtype)
                data.tofile(fout)
                written += data.nbytes
                bar.update(data.nbytes)
            assert written == t.nbytes, (name, written, t.nbytes)
            done.add(name)
    missing = sorted(set(planned) - done)
    if missing:
        raise ModelFormatError(f"The checkpoint lacks {len(missing)} tensors (e.g. {missing[0]}); "
                               "download the model folder again.")


def iter_mapped(source: Iterator[tuple[str, object]], mapper: Callable[[str, object], tuple | None]):
    """(canonical, torch tensor) -> (gguf name, torch tensor) for mapped tensors only."""
    for name, tensor in source:
        mapped = mapper(name, tensor)
        if mapped is not None:
            yield mapped
