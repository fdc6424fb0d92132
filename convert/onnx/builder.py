"""decoder.onnx and embed.onnx written directly with onnx.helper, without torch.

The graph is built from the config alone: every weight is a `Slot` (which
checkpoint tensor, how it is stored) that onnx_stream fills from the checkpoint
one tensor at a time, so the model is never materialised. Same inputs, outputs
and math as tests/support/torch_decoder.py's torch module (transformers' Qwen2/Llama):

  decoder  inputs_embeds [B, L, H] f32, attention_mask [B, S] i64 (S = P + L),
           position_ids [B, L] i64, past_key_values.{i}.key/value [B, kvh, P, hd] f32
           -> logits [B, L, V] f32, present.{i}.key/value [B, kvh, S, hd] f32
  embed    input_ids [B, L] i64 -> inputs_embeds [B, L, H] f32

Weight storage per `mode`: fp32; fp16 (weights and activations fp16 as
onnxruntime's float16 converter would make them, graph inputs/outputs stay
f32, RMSNorm and softmax computed in f32 as transformers does); int8/int4
(MatMulNBits with initializers named as onnxruntime's quantizer names them:
`<weight>_Q{bits}`, `<weight>_scales`). The embedding table is fp32, fp16 or
int4 (GatherBlockQuantized).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .algorithms import NBitsPlan
from .graph import OPSET
from .quant import ACCURACY_LEVEL, QUANT_BITS

MS_DOMAIN = "com.microsoft"
EMBED_NAME = "model.embed_tokens.weight"
# graph mode -> activation/weight float type (quantized modes keep f32 activations)
COMPUTE_TYPE = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "int8": TensorProto.FLOAT,
                "int4": TensorProto.FLOAT}
FLOAT = TensorProto.FLOAT


@dataclass(frozen=True)
class Slot:
    """One checkpoint tensor's place in a graph.

    kind: "linear" (torch [N, K] weight -> MatMul B [K, N] or MatMulNBits),
          "vector" (norm weight or bias, as stored), "table" (embedding [V, H]).
    codec: "fp32", "fp16", "int8" or "int4" (how the bytes are written).
    name: the initializer name (quantized: the base of `_Q{bits}`/`_scales`).
    """

    source: str
    kind: str
    codec: str
    name: str
    shape: tuple
    block_size: int = 32
    algorithm: str = "default"     # int4/int8: algorithms.ALGORITHMS (per-tensor ones only here)
    symmetric: bool = True
    zero_points: str | None = None  # None, "uint8" or "float" (algorithms.NBitsPlan.zero_points)


class Graph:
    """Nodes, small inline constants, and the weight slots of one graph."""

    def __init__(self, mode: str, block_size: int, plan: NBitsPlan | None = None, num_layers: int = 0):
        self.mode, self.block_size = mode, block_size
        self.plan, self.num_layers = plan or NBitsPlan(), num_layers   # int4: algorithm, int8 parts
        self.dtype = COMPUTE_TYPE[mode]
        self.nodes, self.constants, self.slots = [], [], []
        self.inputs, self.outputs = [], []
        self._count = 0
        self._const_names = {}

    def op(self, op_type: str, *inputs: str, out: str | None = None, domain: str = "", **attrs) -> str:
        self._count += 1
        output = out or f"/{op_type}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=f"{op_type}_{self._count}",
                                           domain=domain or None, **attrs))
        return output

    def const(self, values, dtype=np.int64) -> str:
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._const_names:
            name = f"/const_{len(self._const_names)}"
            self.constants.append(numpy_helper.from_array(array, name))
            self._const_names[key] = name
        return self._const_names[key]

    def to_compute(self, x: str) -> str:
        """f32 -> the compute type (a no-op for f32 modes)."""
        return x if self.dtype == FLOAT else self.op("Cast", x, to=self.dtype)

    def to_float(self, x: str) -> str:
        return x if self.dtype == FLOAT else self.op("Cast", x, to=FLOAT)

    def output(self, x: str, out: str) -> str:
        """Publish x (just produced, compute type) as the f32 graph output `out`;
        returns the name later nodes should read x by."""
        if self.dtype != FLOAT:
            self.op("Cast", x, to=FLOAT, out=out)
            return x
        producer = self.nodes[-1]
        assert producer.output[0] == x, "output() must follow the node that makes x"
        producer.output[0] = out      # no Identity copy of logits / present K, V
        return out

    def vector(self, source: str, shape: tuple) -> str:
        codec = "fp16" if self.dtype == TensorProto.FLOAT16 else "fp32"
        self.slots.append(Slot(source, "vector", codec, source, tuple(shape)))
        return source

    def linear(self, x: str, source: str, shape: tuple, bias: str | None = None) -> str:
        """x [..., K] @ W.T for a torch weight W [N, K] (+ bias [N])."""
        n, k = shape
        codec = self.mode
        if codec == "int4" and self.plan.bits(source, self.num_layers) == 8:
            codec = "int8"                                  # a part kept at 8 bits (--keep-int8)
        bits = QUANT_BITS.get(codec)
        zero_points = self.plan.zero_points(bits) if codec == "int4" else None
        algorithm = self.plan.algorithm_for(bits) if codec == "int4" else "default"
        self.slots.append(Slot(source, "linear", codec, source, (n, k), self.block_size, algorithm,
                               zero_points is None, zero_points))
        if bits:
            extra = [f"{source}_zero_points"] if zero_points else []
            y = self.op("MatMulNBits", x, f"{source}_Q{bits}", f"{source}_scales", *extra, domain=MS_DOMAIN,
                        K=k, N=n, bits=bits, block_size=self.block_size, accuracy_level=ACCURACY_LEVEL)
        else:
            y = self.op("MatMul", x, source)
        return self.op("Add", y, self.vector(bias, (n,))) if bias else y

    def model(self, weights: list, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, doc, self.inputs, self.outputs,
                                  initializer=[*self.constants, *weights])
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="huatuo-lite")
        model.ir_version = 10      # INT4 tensors (GatherBlockQuantized) need IR >= 10
        return model


def value_info(name: str, elem, dims: list):
    return helper.make_tensor_value_info(name, elem, dims)


# ---------------------------------------------------------------- decoder ----
def rms_norm(g: Graph, x: str, weight: str, width: int, eps: float) -> str:
    """weight * (x * 1/sqrt(mean(x^2) + eps)), the mean in f32 (x [B, L, H])."""
    xf = g.to_float(x)
    variance = g.op("ReduceMean", g.op("Mul", xf, xf), g.const([-1]), keepdims=1)          # [B, L, 1]
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", variance, g.const(eps, np.float32))))
    return g.op("Mul", g.vector(weight, (width,)), g.to_compute(g.op("Mul", xf, inv)))


def rotary(g: Graph, t, head_dim: int) -> tuple[str, str]:
    """cos, sin [B, 1, L, hd] from position_ids, NEOX layout (freqs repeated twice),
    computed in f32 (angles of late positions need f32) then cast."""
    inv_freq = 1.0 / (np.float32(t.rope_theta) ** (np.arange(0, head_dim, 2).astype(np.float32)
                                                   / np.float32(head_dim)))
    positions = g.op("Unsqueeze", g.op("Cast", "position_ids", to=FLOAT), g.const([2]))      # [B, L, 1]
    freqs = g.op("Mul", positions, g.const(inv_freq, np.float32))                           # [B, L, hd/2]
    angles = g.op("Concat", freqs, freqs, axis=-1)                                          # [B, L, hd]
    return tuple(g.to_compute(g.op("Unsqueeze", g.op(fn, angles), g.const([1]))) for fn in ("Cos", "Sin"))


def mask_bias(g: Graph) -> str:
    """Additive f32 bias [B, 1, 1, L, S]: 0 where key s is visible to query l
    (causal and attention_mask[b, s] > 0), else float32 min (as transformers)."""
    length = g.op("Squeeze", g.op("Shape", "inputs_embeds", start=1, end=2))
    total = g.op("Squeeze", g.op("Shape", "attention_mask", start=1, end=2))
    query_pos = g.op("Range", g.op("Sub", total, length), total, g.const(1))                  # [L]
    key_pos = g.op("Range", g.const(0), total, g.const(1))                                  # [S]
    causal = g.op("LessOrEqual", g.op("Unsqueeze", key_pos, g.const([0])),
                  g.op("Unsqueeze", query_pos, g.const([1])))                               # [L, S]
    padded = g.op("Greater", "attention_mask", g.const(0))                                  # [B, S]
    visible = g.op("And", causal, g.op("Unsqueeze", padded, g.const([1, 2, 3])))            # [B, 1, 1, L, S]
    return g.op("Where", visible, g.const(0.0, np.float32), g.const(np.finfo(np.float32).min, np.float32))


def _heads(g: Graph, x: str, n: int, head_dim: int) -> str:             # [B, L, n*hd] -> [B, n, L, hd]
    return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, n, head_dim])), perm=[0, 2, 1, 3])


def _rope(g: Graph, x: str, cos: str, sin: str, head_dim: int) -> str:
    half = head_dim // 2
    first = g.op("Slice", x, g.const([0]), g.const([half]), g.const([-1]))
    second = g.op("Slice", x, g.const([half]), g.const([head_dim]), g.const([-1]))
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def attention(g: Graph, t, i: int, x: str, cos: str, sin: str, bias: str, names: set) -> str:
    p = f"model.layers.{i}.self_attn."
    hd, heads, kv_heads = t.hidden_size // t.num_heads, t.num_heads, t.num_kv_heads
    kv_width = kv_heads * hd

    def project(m: str, width: int) -> str:
        b = f"{p}{m}_proj.bias"
        return g.linear(x, f"{p}{m}_proj.weight", (width, t.hidden_size), b if b in names else None)

    q = _rope(g, _heads(g, project("q", t.hidden_size), heads, hd), cos, sin, hd)           # [B, nh, L, hd]
    k = _rope(g, _heads(g, project("k", kv_width), kv_heads, hd), cos, sin, hd)             # [B, kvh, L, hd]
    v = _heads(g, project("v", kv_width), kv_heads, hd)
    present = []
    for kind, new in (("key", k), ("value", v)):
        past = g.to_compute(f"past_key_values.{i}.{kind}")
        joined = g.output(g.op("Concat", past, new, axis=2), f"present.{i}.{kind}")          # [B, kvh, S, hd]
        present.append(g.op("Unsqueeze", joined, g.const([2])))                             # [B, kvh, 1, S, hd]
    # GQA without copying K/V per query head: query head h uses KV head h // rep, so
    # group the queries as [B, kvh, rep, L, hd] and let MatMul broadcast over rep.
    grouped = g.op("Reshape", q, g.const([0, kv_heads, heads // kv_heads, -1, hd]))
    scores = g.op("MatMul", grouped, g.op("Transpose", present[0], perm=[0, 1, 2, 4, 3]))  # [B, kvh, rep, L, S]
    scores = g.op("Mul", g.to_float(scores), g.const(hd ** -0.5, np.float32))
    probs = g.to_compute(g.op("Softmax", g.op("Add", scores, bias), axis=-1))
    out = g.op("MatMul", probs, present[1])                                                 # [B, kvh, rep, L, hd]
    out = g.op("Transpose", g.op("Reshape", out, g.const([0, heads, -1, hd])), perm=[0, 2, 1, 3])
    out = g.op("Reshape", out, g.const([0, 0, t.hidden_size]))                               # [B, L, H]
    o_bias = f"{p}o_proj.bias"
    return g.linear(out, f"{p}o_proj.weight", (t.hidden_size, t.hidden_size),
                    o_bias if o_bias in names else None)


def mlp(g: Graph, t, i: int, x: str) -> str:
    p = f"model.layers.{i}.mlp."
    gate = g.linear(x, p + "gate_proj.weight", (t.intermediate_size, t.hidden_size))
    up = g.linear(x, p + "up_proj.weight", (t.intermediate_size, t.hidden_size))
    act = g.op("Mul", gate, g.op("Sigmoid", gate))                                          # SiLU
    return g.linear(g.op("Mul", act, up), p + "down_proj.weight", (t.hidden_size, t.intermediate_size))


ROTARY_INPUTS = ("rotary_cos", "rotary_sin")


def build_decoder(t, names: set, mode: str = "fp32", block_size: int = 32, plan: NBitsPlan | None = None,
                  rotary_inputs: bool = False) -> Graph:
    """The decoder graph for TextConfig `t`; `names`: the checkpoint's canonical
    tensor names (they say which biases exist and whether lm_head is tied); `plan`:
    int4's algorithm, symmetry and parts kept at 8 bits. rotary_inputs: the rotary
    table comes in as inputs rotary_cos / rotary_sin [B, L, hd] (Qwen2.5-VL's 3-D
    positions, computed by the runtime) instead of being built from position_ids [B, L]."""
    g = Graph(mode, block_size, plan, t.num_layers)
    hd = t.hidden_size // t.num_heads
    positions = ([value_info(name, FLOAT, ["b", "l", hd]) for name in ROTARY_INPUTS] if rotary_inputs
                 else [value_info("position_ids", TensorProto.INT64, ["b", "l"])])
    g.inputs = [value_info("inputs_embeds", FLOAT, ["b", "l", t.hidden_size]),
                value_info("attention_mask", TensorProto.INT64, ["b", "s"]), *positions]
    for i in range(t.num_layers):
        g.inputs += [value_info(f"past_key_values.{i}.{kind}", FLOAT, ["b", t.num_kv_heads, "p", hd])
                     for kind in ("key", "value")]
    g.outputs = [value_info("logits", FLOAT, ["b", "l", t.vocab_size])]
    if rotary_inputs:   # [B, L, hd] -> [B, 1, L, hd]: broadcast over the heads as rotary()'s output
        cos, sin = (g.to_compute(g.op("Unsqueeze", name, g.const([1]))) for name in ROTARY_INPUTS)
    else:
        cos, sin = rotary(g, t, hd)
    bias = mask_bias(g)
    x = g.to_compute("inputs_embeds")
    for i in range(t.num_layers):
        p = f"model.layers.{i}."
        x = g.op("Add", x, attention(g, t, i, rms_norm(g, x, p + "input_layernorm.weight", t.hidden_size,
                                                       t.rms_norm_eps), cos, sin, bias, names))
        x = g.op("Add", x, mlp(g, t, i, rms_norm(g, x, p + "post_attention_layernorm.weight", t.hidden_size,
                                                 t.rms_norm_eps)))
        g.outputs += [value_info(f"present.{i}.{kind}", FLOAT, ["b", t.num_kv_heads, "s", hd])
                      for kind in ("key", "value")]
    head = "lm_head.weight" if "lm_head.weight" in names else EMBED_NAME      # tied: the embedding
    x = rms_norm(g, x, "model.norm.weight", t.hidden_size, t.rms_norm_eps)
    g.output(g.linear(x, head, (t.vocab_size, t.hidden_size)), "logits")
    return g


# ------------------------------------------------------------------ embed ----
def build_embed(t, mode: str = "fp32", block_size: int = 32) -> Graph:
    """input_ids -> inputs_embeds; `mode` is the table's storage: fp32, fp16 or int4."""
    g = Graph("fp16" if mode == "fp16" else "fp32", block_size)
    g.inputs = [value_info("input_ids", TensorProto.INT64, ["b", "l"])]
    g.outputs = [value_info("inputs_embeds", FLOAT, ["b", "l", t.hidden_size])]
    g.slots.append(Slot(EMBED_NAME, "table", mode, EMBED_NAME, (t.vocab_size, t.hidden_size), block_size))
    if mode == "int4":
        g.op("GatherBlockQuantized", f"{EMBED_NAME}_Q4", "input_ids", f"{EMBED_NAME}_scales",
             domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=block_size, out="inputs_embeds")
    else:
        g.output(g.op("Gather", EMBED_NAME, "input_ids", axis=0), "inputs_embeds")
    return g
