"""Random weights for the tiny checkpoints, under the canonical (upstream 7B) names.

Plain N(0, 0.02) for matrices, embeddings and biases; norm weights 1 + N(0, 0.02)
(so that a swapped or missing norm shows). Nothing is shaped to flatter any
backend. Drawn in upstream state-dict order from one seeded generator.
"""
from __future__ import annotations

import math

from huatuo_lite.families.text import TEXT_ARCHS

from ..checkpoint.read import PROJECTOR_PREFIX, VISION_PREFIX

STD = 0.02
VIT_STREAM = 7919     # offset of the generator seed for the vit/ "original CLIP" copy


def _draw(gen, shape, kind):
    import torch

    # in place: one fp32 buffer per draw (a 7B embedding is 2.2 GB in fp32), same values as out of place
    noise = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(STD)
    return noise.add_(1.0) if kind == "norm" else noise


def _fill(spec: list, seed: int, dtype) -> dict:
    """[(name, shape, kind)] -> {name: tensor} drawn in list order."""
    return dict(iter_fill(spec, seed, dtype))


def iter_fill(spec: list, seed: int, dtype):
    """(name, tensor) in list order, one at a time: a caller that saves and drops them as they
    come (make_tiny's shard writer) never holds more than one shard. Same stream as _fill."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, shape, kind in spec:
        yield name, _draw(gen, shape, kind).to(dtype)


def _linear(prefix: str, out_f: int, in_f: int, bias: bool = True) -> list:
    spec = [(prefix + ".weight", (out_f, in_f), "w")]
    return spec + ([(prefix + ".bias", (out_f,), "b")] if bias else [])


def _norm(prefix: str, width: int, bias: bool) -> list:
    spec = [(prefix + ".weight", (width,), "norm")]
    return spec + ([(prefix + ".bias", (width,), "b")] if bias else [])


def _text_spec(s, arch: str, rows: int) -> list:
    """Qwen2 / Llama decoder: [V, H] embeddings, per-layer attention (GQA) and SwiGLU."""
    h, head_dim = s.hidden_size, s.hidden_size // s.num_heads
    kv = s.num_kv_heads * head_dim
    qkv_bias = TEXT_ARCHS[arch].qkv_bias
    spec = [("model.embed_tokens.weight", (rows, h), "w")]
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        spec += _linear(p + "self_attn.q_proj", h, h, qkv_bias)
        spec += _linear(p + "self_attn.k_proj", kv, h, qkv_bias)
        spec += _linear(p + "self_attn.v_proj", kv, h, qkv_bias)
        spec += _linear(p + "self_attn.o_proj", h, h, False)
        spec += _linear(p + "mlp.gate_proj", s.intermediate_size, h, False)
        spec += _linear(p + "mlp.up_proj", s.intermediate_size, h, False)
        spec += _linear(p + "mlp.down_proj", h, s.intermediate_size, False)
        spec += _norm(p + "input_layernorm", h, False)
        spec += _norm(p + "post_attention_layernorm", h, False)
    return spec + _norm("model.norm", h, False)


def _encoder_spec(prefix: str, width: int, inter: int, layers: int) -> list:
    """CLIP encoder layers (shared by the vision and text towers)."""
    spec = []
    for j in range(layers):
        p = f"{prefix}encoder.layers.{j}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            spec += _linear(p + "self_attn." + proj, width, width)
        spec += _norm(p + "layer_norm1", width, True)
        spec += _linear(p + "mlp.fc1", inter, width)
        spec += _linear(p + "mlp.fc2", width, inter)
        spec += _norm(p + "layer_norm2", width, True)
    return spec


def vision_spec(s, prefix: str) -> list:
    """CLIP vision model: class [Dv], patch conv [Dv, 3, P, P] (no bias),
    positions [(S/P)^2 + 1, Dv], pre_layrnorm (sic), layers, post_layernorm."""
    dv = s.vision_hidden_size
    positions = (s.image_size // s.patch_size) ** 2 + 1
    spec = [(prefix + "embeddings.class_embedding", (dv,), "w"),
            (prefix + "embeddings.patch_embedding.weight", (dv, 3, s.patch_size, s.patch_size), "w"),
            (prefix + "embeddings.position_embedding.weight", (positions, dv), "w")]
    spec += _norm(prefix + "pre_layrnorm", dv, True)
    spec += _encoder_spec(prefix, dv, s.vision_intermediate_size, s.vision_layers)
    return spec + _norm(prefix + "post_layernorm", dv, True)


def canonical_spec(s, arch: str, rows: int) -> list:
    """Upstream LlavaQwen2/LlavaLlama state-dict order: LLM, vision tower, projector, lm_head."""
    h = s.hidden_size
    spec = _text_spec(s, arch, rows) + vision_spec(s, VISION_PREFIX)
    spec += _linear(PROJECTOR_PREFIX + "0", h, s.vision_hidden_size)   # [H, Dv]
    spec += _linear(PROJECTOR_PREFIX + "2", h, h)                      # [H, H]
    return spec + [("lm_head.weight", (rows, h), "w")]


CANONICAL_DTYPE_BYTES = 2     # bf16, like the upstream shards


def canonical_tensors(s, arch: str, rows: int, seed: int) -> dict:
    """{canonical name: bf16 tensor} for a whole tiny model (all in memory: tests only;
    make_tiny streams the same tensors with iter_canonical)."""
    return dict(iter_canonical(s, arch, rows, seed))


def iter_canonical(s, arch: str, rows: int, seed: int):
    """(canonical name, bf16 tensor) one at a time, in state-dict order."""
    import torch

    return iter_fill(canonical_spec(s, arch, rows), seed, torch.bfloat16)


def spec_nbytes(spec: list, dtype_bytes: int = CANONICAL_DTYPE_BYTES) -> dict:
    """{name: bytes} of a spec's tensors, known before any is drawn (to plan the shards)."""
    return {name: math.prod(shape) * dtype_bytes for name, shape, _ in spec}


def clip_tensors(s, text_config: dict, seed: int) -> dict:
    """The vit/ CLIPModel copy (fp32, like the openai checkpoint): vision tower
    from another stream than the embedded one, plus a tiny text tower."""
    import torch

    t = text_config
    dt, proj = t["hidden_size"], t["projection_dim"]
    spec = vision_spec(s, "vision_model.")
    spec += [("text_model.embeddings.token_embedding.weight", (t["vocab_size"], dt), "w"),
             ("text_model.embeddings.position_embedding.weight", (t["max_position_embeddings"], dt), "w")]
    spec += _encoder_spec("text_model.", dt, t["intermediate_size"], t["num_hidden_layers"])
    spec += _norm("text_model.final_layer_norm", dt, True)
    spec += [("visual_projection.weight", (proj, s.vision_hidden_size), "w"),
             ("text_projection.weight", (proj, dt), "w")]
    tensors = _fill(spec, seed + VIT_STREAM, torch.float32)
    tensors["logit_scale"] = torch.tensor(2.6592, dtype=torch.float32)
    return tensors
