"""Weight quantization of exported fp32 graphs with onnxruntime's own tools.

  int4  MatMulNBits, RTN, symmetric, block 32 (option), accuracy_level 4: int8
        activations inside the kernel, which is what makes int4 fast on CPU
        (measured ~40 tok/s vs ~15 without, 0.5B shape).
  int8  the same weight-only MatMulNBits path with bits=8 (onnxruntime 1.32 has
        it): ~3x more accurate than quantize_dynamic, which also quantizes
        activations (0.045 vs 0.14 relative logit error, 0.5B shape).
  fp16  onnxruntime.transformers.float16 with keep_io_types: graph inputs and
        outputs stay float32, so the runtime (and its numpy KV cache) is the
        same for every quant; casts sit at the graph edges.
  fp32  the exported graph as is.

Only MatMuls with a constant weight are quantized (activation x activation
MatMuls in attention, the Conv patch embedding and norms stay float).
The embedding Gather can be block-quantized too (GatherBlockQuantized).

int4's other algorithms (onnx_algorithms: rtn, k_quant, hqq, asymmetric default) are
per tensor and run while streaming (onnx_stream). GPTQ needs the activations of
every MatMul, so it runs here on a whole fp32 graph (`quantize_gptq`): the fp32
decoder is written first, loaded whole, and run on the calibration windows
(onnx_calibrate). Peak memory is then ~2-3x the fp32 decoder (the graph, the
quantizer's augmented copy with every MatMul input as an output, the session;
plus one K x K float64 Hessian per weight being quantized): fine for the demo and
the tiny models, ~60-90 GB for a 7B (28 GB in fp32), so a 7B's GPTQ belongs on a
big-memory machine; the per-tensor algorithms stream as before.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from huatuo_lite.errors import HuatuoError

from .graph import external_data_path, graph_files, save_graph

QUANT_BITS = {"int4": 4, "int8": 8}
QUANT_MODES = ("fp32", "fp16", "int8", "int4")
VISION_QUANT_MODES = ("fp32", "int8")
ACCURACY_LEVEL = 4          # int8 compute inside MatMulNBits on CPU


def check_mode(mode: str, allowed=QUANT_MODES, what: str = "--quant") -> str:
    if mode not in allowed:
        raise HuatuoError(f"{what} {mode!r} is not supported: choose one of {', '.join(allowed)}.")
    return mode


def _nbits(src: Path, dst: Path, *, bits: int, block_size: int, gather: bool, force: bool) -> list[Path]:
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    ops = ("MatMul", "Gather") if gather else ("MatMul",)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                          accuracy_level=ACCURACY_LEVEL, bits=bits,
                                          op_types_to_quantize=ops)
    quantizer = MatMulNBitsQuantizer(str(src), bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=ops,
                                     algo_config=config)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.ERROR)     # it logs one INFO line per node
    try:
        quantizer.process()
    finally:
        logger.setLevel(level)
    return save_graph(quantizer.model.model, dst, force)


def _fp16(src: Path, dst: Path, *, force: bool, **_) -> list[Path]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    wrapped = OnnxModel(model)
    wrapped.topological_sort()      # the converter appends its input casts last; the checker wants order
    return save_graph(wrapped.model, dst, force)


def _fp32(src: Path, dst: Path, *, force: bool, **_) -> list[Path]:
    if force == (len(graph_files(src)) == 2):   # layout already right: plain copy
        shutil.copyfile(src, dst)
        if len(graph_files(src)) == 2:
            shutil.copyfile(external_data_path(src), external_data_path(dst))
        return graph_files(dst)
    import onnx

    return save_graph(onnx.load(str(src)), dst, force)


def quantize_gptq(src: Path, dst: Path, *, block_size: int, symmetric: bool, reader,
                  force: bool = False) -> list[Path]:
    """The fp32 decoder `src` -> `dst` with GPTQ int4 MatMulNBits; `reader`: an
    onnx_calibrate.DecoderCalibration. Initializers come out named as the quantizer
    names them (`<weight>_Q4G<block>`, `_scale`, `_zp`)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (GPTQWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    config = GPTQWeightOnlyQuantConfig(calibration_data_reader=reader)
    quantizer = MatMulNBitsQuantizer(str(src), bits=4, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=ACCURACY_LEVEL, algo_config=config)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        quantizer.process()
    finally:
        logger.setLevel(level)
    return save_graph(quantizer.model.model, dst, force)


def quantize_graph(src: Path, dst: Path, mode: str, *, block_size: int = 32, gather: bool = False,
                   force_external_data: bool = False) -> list[Path]:
    """Write `dst` (+ its data file) from the fp32 graph `src`; returns the files."""
    check_mode(mode)
    if mode in QUANT_BITS:
        return _nbits(src, dst, bits=QUANT_BITS[mode], block_size=block_size, gather=gather,
                      force=force_external_data)
    converters = {"fp16": _fp16, "fp32": _fp32}
    return converters[mode](src, dst, force=force_external_data)
