"""vision.onnx of the Qwen2.5-VL family, written with the project's own builder
(convert/onnx/builder.py: onnx.helper nodes, weights streamed per tensor, int8 by
MatMulNBits) as a plain stack of transformer blocks.

Everything that depends on the image's size is computed in numpy by the runtime
(huatuo_lite/backends/qwen25vl_tables.py) and fed as inputs, as issue #20 suggests:
the window order, the 2-D rotary table and the two attention masks. The graph
holds no loops, no data-dependent shapes and no cu_seqlens splits, so it stays
exportable and quantizable with the LLaVA family's tools.

Inputs (P patches of one or more images, P a multiple of 4):
  patches        [P, 1176] f32   families.qwen25vl.patchify order (2x2 merge groups)
  window_index   [P/4] i64       merge group gathered into window order (get_window_index)
  rotary_cos/sin [P, hd] f32     vision 2-D rotary, already in window order (hd: head dim)
  full_mask      [P, P] f32      additive: 0 within one image, float32 min across images
  window_mask    [P, P] f32      additive: 0 within one window, float32 min elsewhere
  reverse_index  [P/4] i64       argsort(window_index): merger output back to image order
Output:
  image_features [P/4, H] f32    as transformers' model.visual(patches, grid_thw)

Math per transformers 4.57's Qwen2_5_VisionTransformerPretrainedModel:
  x = patches @ W_patch^T           (the Conv3d with stride = kernel is one matmul)
  x = x.view(P/4, 4, D)[window_index].view(P, D)
  block j (mask: full_mask if j in fullatt_block_indexes else window_mask):
      x += proj(softmax(rope(q) rope(k)^T / sqrt(hd) + mask) v)   on RMSNorm1(x), qkv fused
      x += down(silu(gate(h)) * up(h))                              on RMSNorm2(x), with biases
  y = mlp.2(GELU(mlp.0(RMSNorm_ln_q(x).view(P/4, 4D))))[reverse_index]
A whole-mask softmax equals transformers' per-window split: float32 min underflows
to an exact 0 after the max is subtracted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto

from huatuo_lite.errors import ModelFormatError
from huatuo_lite.families.qwen25vl import MERGE_SIZE, PATCH_VALUES

from ..onnx.builder import FLOAT, Graph, rms_norm, value_info
from ..onnx.stream import write_streamed

PREFIX = "visual."
INPUTS = ("patches", "window_index", "rotary_cos", "rotary_sin", "full_mask", "window_mask", "reverse_index")
OUTPUT = "image_features"
NORM_EPS = 1e-6                   # transformers hard-codes the vision RMSNorm eps
MERGE_UNIT = MERGE_SIZE * MERGE_SIZE


@dataclass(frozen=True)
class VisionDims:
    """What the graph needs of config.json's vision_config (checkpoint.QwenVision + the
    activation); tensor shapes are checked against it while streaming."""

    depth: int
    hidden_size: int              # D
    intermediate_size: int
    num_heads: int
    out_hidden_size: int          # H, the text width
    fullatt_block_indexes: tuple
    window_size: int              # pixels
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def manifest(self) -> dict:
        """The facts the runtime's tables need (manifest "vision")."""
        return {"hidden_size": self.hidden_size, "num_heads": self.num_heads, "head_dim": self.head_dim,
                "out_hidden_size": self.out_hidden_size, "window_size": self.window_size,
                "patch_size": self.patch_size, "spatial_merge_size": self.spatial_merge_size,
                "temporal_patch_size": self.temporal_patch_size,
                "fullatt_block_indexes": list(self.fullatt_block_indexes)}


def vision_dims(ckpt) -> VisionDims:
    """VisionDims of an opened checkpoint (checkpoint.QwenVision, whose reader already
    refused another patch geometry) plus its activation; an unknown one is one sentence."""
    v = ckpt.vision
    act = str((ckpt.config.get("vision_config") or {}).get("hidden_act", "silu"))
    if act not in ACTIVATIONS:
        raise ModelFormatError(f"{ckpt.root}/config.json has the vision activation {act!r}; only "
                               f"{', '.join(ACTIVATIONS)} are supported.")
    return VisionDims(v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size,
                      tuple(v.fullatt_block_indexes), v.window_size, v.patch_size, v.spatial_merge_size,
                      v.temporal_patch_size, act)


def _silu(g: Graph, x: str) -> str:
    return g.op("Mul", x, g.op("Sigmoid", x))


def _gelu(g: Graph, x: str) -> str:                # exact: 0.5 x (1 + erf(x / sqrt 2)), nn.GELU()
    erf = g.op("Erf", g.op("Mul", x, g.const(2 ** -0.5, np.float32)))
    return g.op("Mul", g.op("Mul", x, g.const(0.5, np.float32)), g.op("Add", erf, g.const(1.0, np.float32)))


ACTIVATIONS = {"silu": _silu, "swish": _silu}


def _rotate(g: Graph, x: str, cos: str, sin: str, hd: int) -> str:
    """x * cos + rotate_half(x) * sin for x [nh, P, hd], cos/sin [P, hd] (broadcast)."""
    half = hd // 2
    first = g.op("Slice", x, g.const([0]), g.const([half]), g.const([-1]))
    second = g.op("Slice", x, g.const([half]), g.const([hd]), g.const([-1]))
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def _block(g: Graph, d: VisionDims, j: int, x: str) -> str:
    p = f"{PREFIX}blocks.{j}."
    width, heads, hd = d.hidden_size, d.num_heads, d.head_dim
    h = rms_norm(g, x, p + "norm1.weight", width, NORM_EPS)
    qkv = g.linear(h, p + "attn.qkv.weight", (3 * width, width), p + "attn.qkv.bias")           # [P, 3D]
    qkv = g.op("Transpose", g.op("Reshape", qkv, g.const([0, 3, heads, hd])), perm=[1, 2, 0, 3])  # [3, nh, P, hd]
    q, k, v = (g.op("Squeeze", g.op("Slice", qkv, g.const([i]), g.const([i + 1]), g.const([0])), g.const([0]))
               for i in range(3))
    q = _rotate(g, q, "rotary_cos", "rotary_sin", hd)
    k = _rotate(g, k, "rotary_cos", "rotary_sin", hd)
    mask = "full_mask" if j in d.fullatt_block_indexes else "window_mask"
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 2, 1])), g.const(hd ** -0.5, np.float32))
    probs = g.op("Softmax", g.op("Add", scores, mask), axis=-1)                                 # [nh, P, P]
    attn = g.op("Transpose", g.op("MatMul", probs, v), perm=[1, 0, 2])                          # [P, nh, hd]
    attn = g.op("Reshape", attn, g.const([0, width]))
    x = g.op("Add", x, g.linear(attn, p + "attn.proj.weight", (width, width), p + "attn.proj.bias"))
    h = rms_norm(g, x, p + "norm2.weight", width, NORM_EPS)
    m = p + "mlp."
    gate = g.linear(h, m + "gate_proj.weight", (d.intermediate_size, width), m + "gate_proj.bias")
    up = g.linear(h, m + "up_proj.weight", (d.intermediate_size, width), m + "up_proj.bias")
    act = g.op("Mul", ACTIVATIONS[d.hidden_act](g, gate), up)
    return g.op("Add", x, g.linear(act, m + "down_proj.weight", (width, d.intermediate_size), m + "down_proj.bias"))


def build_vision(d: VisionDims, mode: str = "fp32", block_size: int = 32) -> Graph:
    """The vision graph in `mode` (fp32 or int8: the Linear weights as MatMulNBits,
    the patch embedding, norms and attention stay f32)."""
    g = Graph(mode, block_size)
    width, merged = d.hidden_size, d.hidden_size * MERGE_UNIT
    g.inputs = [value_info("patches", FLOAT, ["p", PATCH_VALUES]),
                value_info("window_index", TensorProto.INT64, ["m"]),
                value_info("rotary_cos", FLOAT, ["p", d.head_dim]),
                value_info("rotary_sin", FLOAT, ["p", d.head_dim]),
                value_info("full_mask", FLOAT, ["p", "p"]),
                value_info("window_mask", FLOAT, ["p", "p"]),
                value_info("reverse_index", TensorProto.INT64, ["m"])]
    g.outputs = [value_info(OUTPUT, FLOAT, ["m", d.out_hidden_size])]
    # Conv3d weight [D, 3, 2, 14, 14] as stored, flattened to [D, 1176] in the graph: the
    # patch values are (channel, time, row, col), the kernel's own order.
    kernel = g.vector(PREFIX + "patch_embed.proj.weight", (width, 3, d.temporal_patch_size, d.patch_size, d.patch_size))
    kernel = g.op("Reshape", kernel, g.const([width, PATCH_VALUES]))
    x = g.op("Gemm", "patches", kernel, transB=1)                                               # [P, D]
    x = g.op("Gather", g.op("Reshape", x, g.const([-1, MERGE_UNIT, width])), "window_index", axis=0)
    x = g.op("Reshape", x, g.const([-1, width]))                                                # window order
    for j in range(d.depth):
        x = _block(g, d, j, x)
    x = rms_norm(g, x, PREFIX + "merger.ln_q.weight", width, NORM_EPS)
    x = g.op("Reshape", x, g.const([-1, merged]))                                               # [P/4, 4D]
    x = _gelu(g, g.linear(x, PREFIX + "merger.mlp.0.weight", (merged, merged), PREFIX + "merger.mlp.0.bias"))
    x = g.linear(x, PREFIX + "merger.mlp.2.weight", (d.out_hidden_size, merged), PREFIX + "merger.mlp.2.bias")
    g.output(g.op("Gather", x, "reverse_index", axis=0), OUTPUT)                               # image order
    return g


def export_vision_streamed(ckpt, dims: VisionDims, path: Path, quant: str = "fp32", block_size: int = 32,
                           force_external_data: bool = False) -> list[Path]:
    """vision.onnx (+ .data) in fp32 or int8 straight from the checkpoint's visual.* tensors."""
    graph = build_vision(dims, quant, block_size)
    return write_streamed(ckpt, graph, Path(path), "vision", (PREFIX,), force_external_data)


__all__ = ["VisionDims", "vision_dims", "build_vision", "export_vision_streamed", "INPUTS", "OUTPUT"]
