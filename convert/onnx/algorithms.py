"""Weight-only 4/8-bit algorithms for MatMulNBits, named as onnxruntime names them
(`matmul_nbits_quantizer --quant_method`: default, rtn, k_quant, hqq, gptq).

  default  onnxruntime's C++ block quantizer (DefaultWeightOnlyQuantizer); symmetric
           (zero point 2^(bits-1)) or asymmetric (a uint8 zero point per block).
  rtn      round-to-nearest in numpy (neural_compressor.quant_tensor, as
           RTNWeightOnlyQuantConfig runs it); symmetric or asymmetric.
  k_quant  llama.cpp's k-quant search (quant_tensor_k_quant_cpu: 20 trial scales per
           block, weighted least squares for scale and min); asymmetric only.
  hqq      half-quadratic optimisation of the zero point (HQQWeightOnlyQuantizer,
           torch); asymmetric only, float zero points.
  gptq     GPTQ (GPTQWeightOnlyQuantConfig): needs activations, so it runs on the
           whole fp32 graph with calibration data (quant.quantize_graph), never here.

default, rtn and k_quant quantize each output column's blocks on their own, so a
weight [N, K] can be quantized in row chunks of N (onnx_stream) with the same bytes
as the whole matrix. hqq stops its iterations on the whole matrix's mean error, so
it gets the whole matrix at once (WHOLE_MATRIX: one weight in float32, a 7B's lm_head
2.2 GB, instead of a 16 MB chunk). Each returns, for torch rows w [n, K] float32:
  packed [n, blocks, block*bits/8] uint8, scales [n, blocks] float32,
  zero points: None | uint8 [n, ceil(blocks*bits/8)] (packed, low nibble first) |
  float32 [n, blocks].
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from huatuo_lite.errors import HuatuoError

ALGORITHMS = ("default", "rtn", "k_quant", "hqq", "gptq")
PER_TENSOR = ("default", "rtn", "k_quant", "hqq")
ASYMMETRIC_ONLY = ("k_quant", "hqq")
WHOLE_MATRIX = ("hqq",)         # results depend on the whole matrix: never chunked
# numpy kernels hold ~this many float temporaries of their chunk (k_quant's 20-step
# search: weights, trial codes, products): stream.py divides its chunk by it, so the
# peak stays ~one chunk of float32 whatever the algorithm
CHUNK_DIVISOR = {"default": 1, "rtn": 4, "k_quant": 16, "hqq": 1}
CALIBRATED = ("gptq",)
# which parts stay at 8 bits inside an int4 model (onnxruntime-genai's int4 algo names)
KEEP_INT8 = {"none": "every MatMul at 4 bits", "lm_head": "lm_head at 8 bits (genai k_quant_last)",
             "mixed": "lm_head, and v_proj/down_proj of llama.cpp's use_more_bits layers, at 8 bits "
                      "(genai k_quant_mixed)"}
# `convert onnx --quant int4` without options: chosen on the demo's validation split
# (bench/quant_candidates.py, issue #21: 100.0% agreement, +0.0 points, KL 3.5e-4 against
# default-sym's 99.1%, -0.3, 5.5e-3), reported on its test split in models/demo/FIDELITY.md.
INT4_DEFAULT = {"algorithm": "k_quant", "keep_int8": "mixed", "embed_quant": "fp16"}
# zero-point storage per algorithm when asymmetric: packed uint8 or float
ZERO_POINTS = {"default": "uint8", "rtn": "uint8", "k_quant": "uint8", "hqq": "float", "gptq": "uint8"}


@dataclass(frozen=True)
class NBitsPlan:
    """How an int4 model's MatMul weights are quantized."""

    algorithm: str = "default"
    symmetric: bool = True
    keep_int8: str = "none"
    calibration: str | None = None        # PubMedVision/eval-format records (gptq)

    def bits(self, source: str, num_layers: int) -> int:
        """4, or 8 for a part kept at 8 bits. source: the checkpoint weight name."""
        if self.keep_int8 == "none":
            return 4
        if source in ("lm_head.weight", "model.embed_tokens.weight"):     # the head (tied or not)
            return 8
        if self.keep_int8 == "mixed" and source.endswith(("self_attn.v_proj.weight", "mlp.down_proj.weight")):
            return 8 if use_more_bits(int(source.split(".")[2]), num_layers) else 4
        return 4

    def zero_points(self, bits: int) -> str | None:
        """None (symmetric), "uint8" or "float" for a weight stored in `bits`."""
        if bits != 4 or self.symmetric:          # parts kept at 8 bits: default, symmetric
            return None
        return ZERO_POINTS[self.algorithm]

    def algorithm_for(self, bits: int) -> str:
        return self.algorithm if bits == 4 else "default"


def use_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's rule (llama-quant.cpp) for the layers whose attn_v/ffn_down get more
    bits in Q4_K_M: the first and last eighth, and every third layer between."""
    return layer < num_layers / 8 or layer >= 7 * num_layers / 8 or (layer - round(num_layers / 8)) % 3 == 2


def check_plan(plan: NBitsPlan, block_size: int) -> NBitsPlan:
    """One sentence for each combination onnxruntime cannot do."""
    if plan.algorithm not in ALGORITHMS:
        raise HuatuoError(f"--algorithm {plan.algorithm!r} is not supported: choose one of {', '.join(ALGORITHMS)}.")
    if plan.keep_int8 not in KEEP_INT8:
        raise HuatuoError(f"--keep-int8 {plan.keep_int8!r} is not supported: choose one of {', '.join(KEEP_INT8)}.")
    if block_size < 16 or block_size & (block_size - 1):
        raise HuatuoError(f"--block-size {block_size} is not supported: use a power of two >= 16 (32 is the default).")
    if plan.symmetric and plan.algorithm in ASYMMETRIC_ONLY:
        raise HuatuoError(f"--algorithm {plan.algorithm} is asymmetric only: drop --symmetric.")
    if plan.algorithm in CALIBRATED and not plan.calibration:
        raise HuatuoError(f"--algorithm {plan.algorithm} needs calibration records: pass --calibration CALIB.json "
                          "(PubMedVision or eval-format question/answer records, not the questions you score).")
    if plan.calibration and plan.algorithm not in CALIBRATED:
        raise HuatuoError(f"--calibration is used only by --algorithm {', '.join(CALIBRATED)}; "
                          f"drop it for {plan.algorithm}.")
    if plan.algorithm == "gptq" and plan.keep_int8 != "none":
        raise HuatuoError("--algorithm gptq cannot keep parts at 8 bits (onnxruntime 1.32's GPTQ writes only "
                          "4-bit MatMulNBits): use --keep-int8 none, or k_quant/hqq/default with --keep-int8.")
    return plan


def default_symmetric(algorithm: str) -> bool:
    """The algorithm's own default: symmetric unless it is asymmetric only."""
    return algorithm not in ASYMMETRIC_ONLY


# --------------------------------------------------------------- kernels ----
def _padded(w: np.ndarray, block_size: int) -> np.ndarray:
    """[n, K] -> [n, blocks*block] with zero columns (as onnxruntime pads)."""
    pad = -w.shape[1] % block_size
    return np.pad(w, ((0, 0), (0, pad))) if pad else w


def _pack_rows(q: np.ndarray, n: int, block_size: int, bits: int) -> np.ndarray:
    """integer codes [n*blocks, block] -> MatMulNBits B [n, blocks, block*bits/8]."""
    q = q.astype(np.uint8).reshape(n, -1, block_size)
    return q if bits == 8 else (q[..., ::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _pack_zero_points(zp: np.ndarray, n: int, bits: int) -> np.ndarray:
    """uint8 zero points [n, blocks] -> [n, ceil(blocks*bits/8)], each column on its own
    (an odd block count is padded with the default 2^(bits-1))."""
    zp = zp.astype(np.uint8).reshape(n, -1)
    if bits == 8:
        return zp
    if zp.shape[1] % 2:
        zp = np.concatenate([zp, np.full((n, 1), 8, np.uint8)], axis=1)
    return (zp[:, ::2] | (zp[:, 1::2] << 4)).astype(np.uint8)


def _default(w, block_size, bits, symmetric):
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    packer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block_size,
                                                                     is_symmetric=symmetric, bits=bits))
    packed, scales, zp = packer.qbits_block_quant(np.ascontiguousarray(w.T))     # w.T: [K, n]
    return packed, scales.astype(np.float32), None if symmetric else zp


def _rtn(w, block_size, bits, symmetric):
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor

    n = w.shape[0]
    q, scale, zp = quant_tensor(_padded(w, block_size), bits, block_size, "sym" if symmetric else "asym", "uint")
    return (_pack_rows(q, n, block_size, bits), scale.reshape(n, -1).astype(np.float32),
            None if symmetric else _pack_zero_points(zp, n, bits))


def _k_quant(w, block_size, bits, symmetric):
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    n = w.shape[0]
    q, scale, zp = quant_tensor_k_quant_cpu(_padded(w, block_size), bits, block_size)
    return (_pack_rows(q, n, block_size, bits), scale.reshape(n, -1).astype(np.float32),
            _pack_zero_points(zp, n, bits))


def _hqq(w, block_size, bits, symmetric):
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import (HQQWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantizer)

    n = w.shape[0]
    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
    q, scale, zero = quantizer.quantize_internal(torch.from_numpy(np.ascontiguousarray(w)), bits=bits,
                                                 group_size=block_size)          # [n, Kp], [n, blocks] x2
    return (_pack_rows(q.numpy(), n, block_size, bits), scale.numpy().reshape(n, -1).astype(np.float32),
            zero.numpy().reshape(n, -1).astype(np.float32))


KERNELS = {"default": _default, "rtn": _rtn, "k_quant": _k_quant, "hqq": _hqq}


def quantize_rows(algorithm: str, w: np.ndarray, block_size: int, bits: int, symmetric: bool):
    """(packed, scales, zero points or None) for torch rows w [n, K] float32."""
    logger = logging.getLogger("onnxruntime.quantization.neural_compressor.weight_only")
    level = logger.level
    logger.setLevel(logging.ERROR)      # k_quant logs a cupy hint per tensor
    try:
        return KERNELS[algorithm](w, block_size, bits, symmetric)
    finally:
        logger.setLevel(level)
