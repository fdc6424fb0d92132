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

from ..onnx.algorithms import NBitsPlan
from ..onnx.builder import ROTARY_INPUTS, Graph
from ..onnx.builder import build_decoder as build_text_decoder
from ..onnx.stream import DECODER_PREFIXES, write_streamed


def build_decoder(t, names: set, mode: str = "fp32", block_size: int = 32, plan: NBitsPlan | None = None) -> Graph:
    """The builder's decoder with the rotary table as inputs (rotary_cos / rotary_sin)."""
    return build_text_decoder(t, names, mode, block_size, plan, rotary_inputs=True)


def export_decoder_streamed(ckpt, text, path: Path, quant: str = "fp32", block_size: int = 32,
                            force_external_data: bool = False, plan: NBitsPlan | None = None) -> list[Path]:
    """decoder.onnx (+ .data) in fp32/fp16/int8/int4 straight from the checkpoint."""
    graph = build_decoder(text, set(ckpt.names()), quant, block_size, plan)
    return write_streamed(ckpt, graph, Path(path), "decoder", DECODER_PREFIXES, force_external_data)


__all__ = ["build_decoder", "export_decoder_streamed", "ROTARY_INPUTS"]
