"""decoder.onnx of the Qwen2.5-VL family: the LLaVA family's streamed decoder
(convert/onnx/builder.py) with the rotary table as inputs instead of position ids.

Multimodal RoPE needs three position streams per token and a per-channel pick of
stream (mrope_section); the runtime computes cos/sin in numpy from the 3-D positions
(huatuo_lite/backends/qwen25vl_tables.mrope_cos_sin) so the graph applies them as it
would 1-D ones. Everything else (Qwen2 blocks with q/k/v biases, GQA, the KV cache,
fp32/fp16/int8/int4 storage) is the builder's own code, reused, not copied.

  inputs_embeds [B, L, H] f32, attention_mask [B, S] i64 (S = P + L),
  rotary_cos / rotary_sin [B, L, hd] f32, past_key_values.{i}.key/value [B, kvh, P, hd] f32
  -> logits [B, L, V] f32, present.{i}.key/value [B, kvh, S, hd] f32
"""
from __future__ import annotations

from pathlib import Path

from onnx import TensorProto

from ..onnx.algorithms import NBitsPlan
from ..onnx.builder import EMBED_NAME, FLOAT, Graph, attention, mask_bias, mlp, rms_norm, value_info
from ..onnx.stream import DECODER_PREFIXES, write_streamed

ROTARY_INPUTS = ("rotary_cos", "rotary_sin")


def build_decoder(t, names: set, mode: str = "fp32", block_size: int = 32, plan: NBitsPlan | None = None) -> Graph:
    """The decoder for TextConfig-like `t` (hidden_size, num_heads, num_kv_heads,
    intermediate_size, num_layers, vocab_size, rms_norm_eps); `names`: the canonical
    tensor names (biases present, lm_head tied or not)."""
    g = Graph(mode, block_size, plan, t.num_layers)
    hd = t.hidden_size // t.num_heads
    g.inputs = [value_info("inputs_embeds", FLOAT, ["b", "l", t.hidden_size]),
                value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
                *(value_info(name, FLOAT, ["b", "l", hd]) for name in ROTARY_INPUTS)]
    for i in range(t.num_layers):
        g.inputs += [value_info(f"past_key_values.{i}.{kind}", FLOAT, ["b", t.num_kv_heads, "p", hd])
                     for kind in ("key", "value")]
    g.outputs = [value_info("logits", FLOAT, ["b", "l", t.vocab_size])]
    # [B, L, hd] -> [B, 1, L, hd]: broadcast over the heads as the builder's rotary() output
    cos, sin = (g.to_compute(g.op("Unsqueeze", name, g.const([1]))) for name in ROTARY_INPUTS)
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


def export_decoder_streamed(ckpt, text, path: Path, quant: str = "fp32", block_size: int = 32,
                            force_external_data: bool = False, plan: NBitsPlan | None = None) -> list[Path]:
    """decoder.onnx (+ .data) in fp32/fp16/int8/int4 straight from the checkpoint."""
    graph = build_decoder(text, set(ckpt.names()), quant, block_size, plan)
    return write_streamed(ckpt, graph, Path(path), "decoder", DECODER_PREFIXES, force_external_data)


__all__ = ["build_decoder", "export_decoder_streamed", "ROTARY_INPUTS"]
