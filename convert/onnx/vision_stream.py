"""vision.onnx written with onnx.helper and its weights streamed per tensor, like
the decoder (onnx_stream): exporting the real CLIP-L tower through torch.onnx
peaked at 4.7 GB above baseline for a 1.1 GB graph (measured here); this holds
about one tensor.

pixel_values [N, 3, S, S] f32 -> image_features [N, T, H] f32, the math of
onnx_vision's torch graph (transformers' CLIPVisionModel truncated at
`select_layer`, eager attention, CLS dropped, then the mlp2x_gelu projector):

  patches = Conv(pixels, patch_embedding, stride=patch)      [N, Dv, g, g] -> [N, T, Dv]
  x = [class_embedding; patches] + position_embedding         [N, 1+T, Dv]
  x = pre_layrnorm(x); then per kept layer:
      x += out_proj(softmax(q k^T * hd^-0.5) v)  on layer_norm1(x)
      x += fc2(act(fc1(layer_norm2(x))))
  features = Linear(GELU(Linear(x[:, 1:])))                  [N, T, H]

int8 (`--vision-quant int8`) packs the same MatMul weights as onnxruntime's graph
quantizer did (MatMulNBits, 8 bits); the Conv stays f32. fp16 stores the same MatMul
weights as float16 initializers, each read through a Cast to float32: half the bytes,
the arithmetic still f32 (the Conv, norms, biases and embeddings stay f32: 5 MB of the
CLIP-L tower's 1.2 GB). onnxruntime's defaults would turn every Cast(initializer)
back into an fp32 copy at session start, so the converters record the graph as "fp16"
in manifest.json and the runtime opens it with CAST_WEIGHTS_PLAN
(huatuo_lite/backends/vision_onnx.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from huatuo_lite.errors import ModelFormatError

from ..checkpoint.read import PROJECTOR_PREFIX, VISION_PREFIX
from .builder import FLOAT, Graph, Slot, value_info
from .stream import write_streamed
from .vision import INPUT_NAME, OUTPUT_NAME, kept_layers


# vision weights mode -> the compute mode of builder.Graph (fp16 keeps f32 arithmetic)
COMPUTE_MODE = {"fp32": "fp32", "fp16": "fp32", "int8": "int8"}


class WeightGraph(Graph):
    """builder.Graph whose fp16 mode stores only the MatMul weights in float16 and casts
    them to float32 in the graph (builder's own fp16 mode computes in float16)."""

    def __init__(self, weights: str, block_size: int):
        super().__init__(COMPUTE_MODE[weights], block_size)
        self.weights = weights

    def linear(self, x: str, source: str, shape: tuple, bias: str | None = None) -> str:
        if self.weights != "fp16":
            return super().linear(x, source, shape, bias)
        n, k = shape                             # torch W [N, K] -> B [K, N] float16 -> Cast f32
        self.slots.append(Slot(source, "linear", "fp16", source, (n, k)))
        y = self.op("MatMul", x, self.op("Cast", source, to=FLOAT))
        return self.op("Add", y, self.vector(bias, (n,))) if bias else y


def _quick_gelu(g: Graph, x: str) -> str:          # x * sigmoid(1.702 x), CLIP's activation
    return g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, g.const(1.702, np.float32))))


def _gelu(g: Graph, x: str) -> str:                # exact: 0.5 x (1 + erf(x / sqrt 2))
    erf = g.op("Erf", g.op("Mul", x, g.const(2 ** -0.5, np.float32)))
    return g.op("Mul", g.op("Mul", x, g.const(0.5, np.float32)), g.op("Add", erf, g.const(1.0, np.float32)))


ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": _gelu}


def _layer_norm(g: Graph, x: str, prefix: str, width: int, eps: float) -> str:
    return g.op("LayerNormalization", x, g.vector(prefix + ".weight", (width,)),
                g.vector(prefix + ".bias", (width,)), axis=-1, epsilon=eps)


def _linear(g: Graph, x: str, prefix: str, n: int, k: int) -> str:
    return g.linear(x, prefix + ".weight", (n, k), prefix + ".bias")


def _encoder_layer(g: Graph, vc, j: int, x: str, act) -> str:
    p = f"{VISION_PREFIX}encoder.layers.{j}."
    width, heads = vc.hidden_size, vc.num_heads
    hd = width // heads
    h = _layer_norm(g, x, p + "layer_norm1", width, vc.layer_norm_eps)

    def split(name: str) -> str:                   # [N, T', Dv] -> [N, heads, T', hd]
        y = _linear(g, h, p + f"self_attn.{name}", width, width)
        return g.op("Transpose", g.op("Reshape", y, g.const([0, 0, heads, hd])), perm=[0, 2, 1, 3])

    q, k, v = split("q_proj"), split("k_proj"), split("v_proj")
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(hd ** -0.5, np.float32))
    attn = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)                          # [N, heads, T', hd]
    attn = g.op("Reshape", g.op("Transpose", attn, perm=[0, 2, 1, 3]), g.const([0, 0, width]))
    x = g.op("Add", x, _linear(g, attn, p + "self_attn.out_proj", width, width))
    h = _layer_norm(g, x, p + "layer_norm2", width, vc.layer_norm_eps)
    h = _linear(g, act(g, _linear(g, h, p + "mlp.fc1", vc.intermediate_size, width)), p + "mlp.fc2",
                width, vc.intermediate_size)
    return g.op("Add", x, h)


def _embeddings(g: Graph, vc) -> str:
    e = VISION_PREFIX + "embeddings."
    dv, patch, grid = vc.hidden_size, vc.patch_size, vc.image_size // vc.patch_size
    weight = g.vector(e + "patch_embedding.weight", (dv, 3, patch, patch))
    patches = g.op("Conv", INPUT_NAME, weight, kernel_shape=[patch, patch], strides=[patch, patch])
    patches = g.op("Transpose", g.op("Reshape", patches, g.const([0, dv, -1])), perm=[0, 2, 1])   # [N, T, Dv]
    batch = g.op("Shape", INPUT_NAME, start=0, end=1)
    cls = g.op("Expand", g.op("Reshape", g.vector(e + "class_embedding", (dv,)), g.const([1, 1, dv])),
               g.op("Concat", batch, g.const([1, dv]), axis=0))                                # [N, 1, Dv]
    x = g.op("Concat", cls, patches, axis=1)
    return g.op("Add", x, g.vector(e + "position_embedding.weight", (grid * grid + 1, dv)))


def build_vision(vc, pc, mode: str = "fp32", block_size: int = 32) -> Graph:
    """The vision graph for VisionConfig `vc` and ProjectorConfig `pc`; `mode`: how the
    MatMul weights are stored (COMPUTE_MODE: fp32, fp16, int8)."""
    if vc.hidden_act not in ACTIVATIONS:
        raise ModelFormatError(f"The vision tower's activation {vc.hidden_act!r} is not supported "
                               f"(only {', '.join(ACTIVATIONS)}); this is not a CLIP tower.")
    if pc.kind != "mlp2x_gelu":
        raise ModelFormatError(f"The projector type {pc.kind!r} is not supported (only mlp2x_gelu); "
                               "this is not a HuatuoGPT-Vision checkpoint.")
    g = WeightGraph(mode, block_size)
    size, tokens = vc.image_size, (vc.image_size // vc.patch_size) ** 2
    g.inputs = [value_info(INPUT_NAME, FLOAT, ["images", 3, size, size])]
    g.outputs = [value_info(OUTPUT_NAME, FLOAT, ["images", tokens, pc.out_features])]
    x = _layer_norm(g, _embeddings(g, vc), VISION_PREFIX + "pre_layrnorm", vc.hidden_size, vc.layer_norm_eps)
    for j in range(kept_layers(vc.num_layers, vc.select_layer)):
        x = _encoder_layer(g, vc, j, x, ACTIVATIONS[vc.hidden_act])
    x = g.op("Slice", x, g.const([1]), g.const([np.iinfo(np.int64).max]), g.const([1]))      # drop CLS
    x = _gelu(g, _linear(g, x, PROJECTOR_PREFIX + "0", pc.out_features, pc.in_features))
    g.output(_linear(g, x, PROJECTOR_PREFIX + "2", pc.out_features, pc.out_features), OUTPUT_NAME)
    return g


def export_vision_streamed(ckpt, path: Path, quant: str = "fp32", block_size: int = 32,
                           force_external_data: bool = False) -> list[Path]:
    """vision.onnx (+ .data) in fp32, fp16 or int8 weights straight from the checkpoint."""
    graph = build_vision(ckpt.vision, ckpt.projector, quant, block_size)
    return write_streamed(ckpt, graph, Path(path), "vision", (VISION_PREFIX, PROJECTOR_PREFIX),
                          force_external_data)


__all__ = ["build_vision", "export_vision_streamed", "COMPUTE_MODE"]
