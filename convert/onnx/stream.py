"""Weight-streaming export of decoder.onnx and embed.onnx: the model is never
materialised, so a real 7B/34B converts on a laptop-class machine.

onnx_builder makes the graph structure from the config (no weights); here each
weight slot is filled from the checkpoint one tensor at a time, converted and
(if asked) quantized in row/column chunks of ~CHUNK_BYTES of float32, and
written at its offset in `<graph>.onnx.data`. Peak memory is about one stored
tensor (the checkpoint reader's copy, e.g. a 7B's lm_head: 152064 x 3584 bf16,
1.1 GB) plus one float32 chunk and its encoded bytes; the fp32 model (28 GB
for a 7B) is never held, and the TorchScript exporter and the graph quantizer
(2-3x the fp32 size) are not involved.

Quantized numerics are those of onnxruntime's graph quantizer (onnx_quant): the
same MatMulNBits packing kernel (DefaultWeightOnlyQuantizer.qbits_block_quant,
each block from one output column, so column chunks pack identically) and the
same GatherBlockQuantized packing (quantize_ndarray along H, row chunks).

Graphs whose weights fit in INLINE_BYTES are re-saved as one .onnx file (the
layout the torch exporter gave small models); larger ones, or any when forced,
keep the `.onnx.data` file.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
from onnx import TensorProto
from tqdm import tqdm

from huatuo_lite.errors import ModelFormatError

from .builder import Slot, build_decoder, build_embed
from .graph import INLINE_BYTES, external_data_path, graph_files, save_graph
from .algorithms import CHUNK_DIVISOR, WHOLE_MATRIX, NBitsPlan, quantize_rows
from .quant import QUANT_BITS

CHUNK_BYTES = 16 * 2**20     # float32 bytes converted at once (a 7B lm_head is 2.2 GB in float32)
ALIGN = 4096                 # tensor offsets in the .data file: page-aligned for memory mapping
# decoder weights come from these checkpoint prefixes (one pass each, shard by shard)
DECODER_PREFIXES = ("model.layers.", "model.norm.", "lm_head.")
NUMPY_TYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}


class DataFile:
    """The external-data file of one graph: space is reserved per tensor, then
    filled chunk by chunk with pwrite; initializers point at their ranges."""

    def __init__(self, path: Path):
        self.path, self.size = path, 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def close(self) -> None:
        os.close(self._fd)

    def tensor(self, name: str, data_type: int, dims: list, nbytes: int) -> tuple[TensorProto, int]:
        """An initializer stored at a fresh offset; returns (proto, offset)."""
        offset = -(-self.size // ALIGN) * ALIGN
        self.size = offset + nbytes
        proto = TensorProto(name=name, data_type=data_type, dims=[int(d) for d in dims])
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", offset), ("length", nbytes)):
            entry = proto.external_data.add()
            entry.key, entry.value = key, str(value)
        return proto, offset

    def write_at(self, offset: int, array: np.ndarray) -> None:
        view = memoryview(np.ascontiguousarray(array)).cast("B")
        while len(view):
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done


def _chunk(row_elements: int) -> int:
    """Rows (of row_elements float32 values) per chunk."""
    return max(1, CHUNK_BYTES // (4 * row_elements))


def _as(block, codec: str) -> np.ndarray:
    """A torch block -> numpy float32 or float16 (clipped to the fp16 range, as
    onnxruntime's float16 converter does)."""
    array = block.float().numpy()
    if codec == "fp16":
        limit = np.finfo(np.float16).max
        return np.clip(array, -limit, limit).astype(np.float16)
    return array


# ---------------------------------------------------------------- encoders ----
def _dense_linear(w, slot: Slot, data: DataFile) -> list:
    """torch W [N, K] -> MatMul B [K, N], written K-rows at a time."""
    n, k = w.shape
    np_type, onnx_type = NUMPY_TYPES[slot.codec]
    item = np.dtype(np_type).itemsize
    proto, offset = data.tensor(slot.name, onnx_type, [k, n], k * n * item)
    step = _chunk(n)
    for k0 in range(0, k, step):
        data.write_at(offset + k0 * n * item, _as(w[:, k0:k0 + step].T.contiguous(), slot.codec))
    return [proto]


def _nbits_linear(w, slot: Slot, data: DataFile) -> list:
    """torch W [N, K] -> MatMulNBits B [N, K/bs, bs*bits/8] uint8 + scales [N, K/bs] f32
    (+ zero points: uint8 [N, ceil(K/bs*bits/8)] or f32 [N, K/bs] when asymmetric),
    quantized by slot.algorithm (onnx_algorithms: onnxruntime's own kernels) on row chunks
    of W (each output column's blocks on their own; hqq: the whole matrix at once)."""
    bits = QUANT_BITS[slot.codec]
    n, k = w.shape
    blocks, blob = -(-k // slot.block_size), -(-slot.block_size * bits // 8)
    packed, packed_at = data.tensor(f"{slot.name}_Q{bits}", TensorProto.UINT8, [n, blocks, blob],
                                    n * blocks * blob)
    scales, scales_at = data.tensor(f"{slot.name}_scales", TensorProto.FLOAT, [n, blocks], n * blocks * 4)
    protos, zp_at, zp_row = [packed, scales], None, 0
    if slot.zero_points:
        zp_row = blocks * 4 if slot.zero_points == "float" else -(-blocks * bits // 8)
        zp_type = TensorProto.FLOAT if slot.zero_points == "float" else TensorProto.UINT8
        zp, zp_at = data.tensor(f"{slot.name}_zero_points", zp_type,
                                [n, zp_row // 4 if slot.zero_points == "float" else zp_row], n * zp_row)
        protos.append(zp)
    step = n if slot.algorithm in WHOLE_MATRIX else max(1, _chunk(k) // CHUNK_DIVISOR[slot.algorithm])
    for n0 in range(0, n, step):
        rows = np.ascontiguousarray(w[n0:n0 + step].float().numpy())                # [n, K] float32
        q, s, z = quantize_rows(slot.algorithm, rows, slot.block_size, bits, slot.symmetric)
        data.write_at(packed_at + n0 * blocks * blob, q)
        data.write_at(scales_at + n0 * blocks * 4, s.astype(np.float32, copy=False))
        if zp_at is not None:
            data.write_at(zp_at + n0 * zp_row, z)
    return protos


def _dense_rows(w, slot: Slot, data: DataFile) -> list:
    """A vector or the embedding table as stored, rows at a time."""
    np_type, onnx_type = NUMPY_TYPES[slot.codec]
    item = np.dtype(np_type).itemsize
    rows = w.reshape(w.shape[0], -1)
    width = rows.shape[1]
    proto, offset = data.tensor(slot.name, onnx_type, list(w.shape), rows.numel() * item)
    step = _chunk(width)
    for r0 in range(0, rows.shape[0], step):
        data.write_at(offset + r0 * width * item, _as(rows[r0:r0 + step], slot.codec))
    return [proto]


def _int4_table(w, slot: Slot, data: DataFile) -> list:
    """Embedding [V, H] -> GatherBlockQuantized int4 [V, H] (2 per byte) + scales
    [V, H/bs] f32, quantized along H (onnxruntime's quantize_ndarray), rows at a time."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    v, h = w.shape
    blocks = -(-h // slot.block_size)
    packed, packed_at = data.tensor(f"{slot.name}_Q4", TensorProto.INT4, [v, h], (v * h + 1) // 2)
    scales, scales_at = data.tensor(f"{slot.name}_scales", TensorProto.FLOAT, [v, blocks], v * blocks * 4)
    step = _chunk(h)
    step += step % 2 if h % 2 else 0        # odd H: an even row count keeps chunks byte-aligned
    for r0 in range(0, v, step):
        q, s, _ = DefaultWeightOnlyQuantizer.quantize_ndarray(w[r0:r0 + step].float().numpy(), 1,
                                                              slot.block_size, True)
        data.write_at(packed_at + r0 * h // 2, q)
        data.write_at(scales_at + r0 * blocks * 4, s.astype(np.float32, copy=False))
    return [packed, scales]


def _encoder(slot: Slot):
    """(kind, codec) -> encoder; a table instead of a chain of ifs."""
    table = {("linear", "fp32"): _dense_linear, ("linear", "fp16"): _dense_linear,
             ("linear", "int8"): _nbits_linear, ("linear", "int4"): _nbits_linear,
             ("vector", "fp32"): _dense_rows, ("vector", "fp16"): _dense_rows,
             ("table", "fp32"): _dense_rows, ("table", "fp16"): _dense_rows,
             ("table", "int4"): _int4_table}
    return table[(slot.kind, slot.codec)]


# ------------------------------------------------------------------ driver ----
def _check_shape(ckpt, slot: Slot, tensor) -> None:
    if tuple(tensor.shape) != slot.shape:
        raise ModelFormatError(f"{ckpt.root}: tensor {slot.source} has shape {tuple(tensor.shape)}, but the "
                               f"config implies {slot.shape}; the weights do not match config.json.")


def stream_weights(ckpt, slots: list, data: DataFile, prefixes: tuple = ()) -> list:
    """Encode every slot's checkpoint tensor into `data`, one tensor in memory at a
    time: one pass per prefix shard by shard, then single reads for what is left
    (the embedding behind a tied lm_head). Returns the initializers."""
    wanted = defaultdict(list)
    for slot in slots:
        wanted[slot.source].append(slot)
    weights = []
    progress = tqdm(total=len(slots), desc=data.path.name.removesuffix(".data"), unit="tensor", leave=False)

    def encode(name: str, tensor) -> None:
        for slot in wanted.pop(name, []):
            _check_shape(ckpt, slot, tensor)
            weights.extend(_encoder(slot)(tensor, slot, data))
            progress.update()

    for prefix in prefixes:
        for name, tensor in ckpt.iter_tensors(prefix):
            encode(name, tensor)
            del tensor                  # before the reader makes the next one
    for name in list(wanted):
        encode(name, ckpt.get(name))
    progress.close()
    return weights


def write_streamed(ckpt, graph, path: Path, doc: str, prefixes: tuple = (),
                   force_external_data: bool = False) -> list[Path]:
    """Stream `graph`'s weights into path's .data file and save the structure
    next to it; inline the weights when small and not forced. Returns the files."""
    import onnx

    data = DataFile(external_data_path(path))
    try:
        weights = stream_weights(ckpt, graph.slots, data, prefixes)
    finally:
        data.close()
    onnx.save_model(graph.model(weights, doc), str(path))
    if force_external_data or data.size > INLINE_BYTES:
        return graph_files(path)
    model = onnx.load(str(path))                    # small: pull the weights in, one file
    external_data_path(path).unlink()
    return save_graph(model, path, force_external_data=False)


def export_decoder_streamed(ckpt, path: Path, quant: str = "fp32", block_size: int = 32,
                            force_external_data: bool = False, plan: NBitsPlan | None = None) -> list[Path]:
    """decoder.onnx (+ .data) in `quant` (fp32, fp16, int8, int4) straight from the checkpoint;
    `plan`: int4's per-tensor algorithm, symmetry and 8-bit parts (not gptq: quant.py)."""
    graph = build_decoder(ckpt.text, set(ckpt.names()), quant, block_size, plan)
    return write_streamed(ckpt, graph, Path(path), "decoder", DECODER_PREFIXES, force_external_data)


def export_embed_streamed(ckpt, path: Path, quant: str = "fp32", block_size: int = 32,
                          force_external_data: bool = False) -> list[Path]:
    """embed.onnx (+ .data) with the table in `quant` (fp32, fp16, int4)."""
    graph = build_embed(ckpt.text, quant, block_size)
    return write_streamed(ckpt, graph, Path(path), "embed", (), force_external_data)


__all__ = ["export_decoder_streamed", "export_embed_streamed", "stream_weights", "write_streamed", "DataFile"]
