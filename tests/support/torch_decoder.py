"""The text side as a small torch module (the reference for the ONNX graphs):
parameters carry the canonical checkpoint names (loading is a strict
name-for-name copy), the KV cache is plain tensors in and out (no transformers
Cache objects inside an exported graph).

`huatuo-lite convert onnx` no longer exports this module: it holds the model
in float32 and torch.onnx copies it again (a 7B needs 2-3x its 28 GB), so the
CLI writes embed.onnx/decoder.onnx with onnx_stream (same inputs, outputs and
math, weights streamed per tensor). export_decoder/export_embed stay for the
tests that hold the streamed graphs to this module and to the dynamo exporter.

embed.onnx    input_ids [B, L] int64 -> inputs_embeds [B, L, H] float32
decoder.onnx  inputs_embeds [B, L, H], attention_mask [B, S] int64 (S = P + L),
              position_ids [B, L] int64, past_key_values.{i}.key/value [B, kvh, P, hd]
              -> logits [B, L, V] float32, present.{i}.key/value [B, kvh, S, hd]

The math is transformers' Qwen2/Llama (RMSNorm in fp32, NEOX rotary with
inv_freq = 1/theta^(2i/hd), GQA by repeating KV heads, softmax in fp32, SwiGLU);
tests hold it to transformers' own model within 1e-4.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from huatuo_lite.errors import ModelFormatError

from huatuo_lite.convert.onnx.graph import export_graph

EMBED_NAME = "model.embed_tokens.weight"
TEXT_PREFIXES = ("model.layers.", "model.norm.", "lm_head.")


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """past_key_values.{i}.key/value or present.{i}.key/value, layer by layer."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, t, o_bias: bool):
        super().__init__()
        self.heads, self.kv_heads = t.num_heads, t.num_kv_heads
        self.head_dim = t.hidden_size // t.num_heads
        kv_width = self.kv_heads * self.head_dim
        self.q_proj = nn.Linear(t.hidden_size, t.hidden_size, bias=t.attention_bias)
        self.k_proj = nn.Linear(t.hidden_size, kv_width, bias=t.attention_bias)
        self.v_proj = nn.Linear(t.hidden_size, kv_width, bias=t.attention_bias)
        self.o_proj = nn.Linear(t.hidden_size, t.hidden_size, bias=o_bias)

    def _heads(self, x, n):             # [B, L, n*hd] -> [B, n, L, hd]
        return x.view(x.shape[0], x.shape[1], n, self.head_dim).transpose(1, 2)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        q = self._heads(self.q_proj(x), self.heads)
        k = self._heads(self.k_proj(x), self.kv_heads)
        v = self._heads(self.v_proj(x), self.kv_heads)
        q = q * cos + rotate_half(q) * sin           # cos/sin [B, 1, L, hd]
        k = k * cos + rotate_half(k) * sin
        k = torch.cat((past_k, k), dim=2)            # [B, kvh, S, hd]
        v = torch.cat((past_v, v), dim=2)
        # GQA without copying K/V per query head: query head h uses KV head h // rep,
        # so group the queries as [B, kvh, rep*L, hd] and multiply by K/V directly.
        b, length, rep = q.shape[0], q.shape[2], self.heads // self.kv_heads
        grouped = q.reshape(b, self.kv_heads, rep * length, self.head_dim)
        scores = torch.matmul(grouped, k.transpose(2, 3)) * self.head_dim ** -0.5   # [B, kvh, rep*L, S]
        scores = scores.view(b, self.kv_heads, rep, length, -1) + bias[:, :, None]  # bias [B, 1, 1, L, S]
        probs = torch.softmax(scores, dim=-1).view(b, self.kv_heads, rep * length, -1)
        out = torch.matmul(probs, v).view(b, self.heads, length, self.head_dim).transpose(1, 2)  # [B, L, nh, hd]
        return self.o_proj(out.reshape(out.shape[0], out.shape[1], -1)), k, v


class MLP(nn.Module):
    def __init__(self, t):
        super().__init__()
        self.gate_proj = nn.Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.up_proj = nn.Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.down_proj = nn.Linear(t.intermediate_size, t.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, t, o_bias: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.self_attn = Attention(t, o_bias)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.mlp = MLP(t)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_k, past_v)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Body(nn.Module):
    def __init__(self, t, o_bias: bool):
        super().__init__()
        self.layers = nn.ModuleList(Layer(t, o_bias) for _ in range(t.num_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)


class DecoderGraph(nn.Module):
    """Decoder with explicit KV tensors; parameter names == canonical names."""

    def __init__(self, t, o_bias: bool = False):
        super().__init__()
        self.model = Body(t, o_bias)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        head_dim = t.hidden_size // t.num_heads
        inv_freq = 1.0 / (t.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _rotary(self, position_ids):                 # [B, L] -> cos, sin [B, 1, L, hd]
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]

    @staticmethod
    def _mask_bias(attention_mask, length):          # [B, S] -> additive [B, 1, L, S]
        total = attention_mask.shape[1]
        query_pos = torch.arange(length, device=attention_mask.device) + (total - length)
        key_pos = torch.arange(total, device=attention_mask.device)
        causal = key_pos[None, :] <= query_pos[:, None]                       # [L, S]
        allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
        zero = torch.zeros((), dtype=torch.float32)
        return torch.where(allowed, zero, torch.finfo(torch.float32).min)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        cos, sin = self._rotary(position_ids)
        bias = self._mask_bias(attention_mask, inputs_embeds.shape[1])
        x, present = inputs_embeds, []
        for i, layer in enumerate(self.model.layers):
            x, k, v = layer(x, cos, sin, bias, past[2 * i], past[2 * i + 1])
            present += [k, v]
        return (self.lm_head(self.model.norm(x)), *present)


class EmbedGraph(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(weight, freeze=True)

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


def build_decoder(ckpt) -> DecoderGraph:
    t = ckpt.text
    names = set(ckpt.names())
    decoder = DecoderGraph(t, o_bias="model.layers.0.self_attn.o_proj.bias" in names)
    state = {name: tensor.float() for name, tensor in ckpt.iter_tensors() if name.startswith(TEXT_PREFIXES)}
    if "lm_head.weight" not in state:        # tied embeddings (absent lm_head)
        state["lm_head.weight"] = ckpt.get(EMBED_NAME).float()
    result = decoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelFormatError(
            f"The checkpoint's text model does not match its config (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); the checkpoint is incomplete or not supported.")
    return decoder.eval()


def build_embed(ckpt) -> EmbedGraph:
    return EmbedGraph(ckpt.get(EMBED_NAME).float()).eval()


def decoder_example(t, batch: int = 2, length: int = 3, past: int = 5):
    """Inputs with every dynamic dim >= 2 and distinct (so none is specialised)."""
    gen = torch.Generator().manual_seed(0)
    head_dim = t.hidden_size // t.num_heads
    embeds = torch.randn(batch, length, t.hidden_size, generator=gen) * 0.02
    mask = torch.ones(batch, past + length, dtype=torch.int64)
    positions = torch.arange(past, past + length, dtype=torch.int64)[None].repeat(batch, 1)
    kv = tuple(torch.randn(batch, t.num_kv_heads, past, head_dim, generator=gen)
               for _ in range(2 * t.num_layers))
    return (embeds, mask, positions, *kv)


def export_decoder(ckpt, path: Path, force_external_data: bool = False, exporter: str = "torchscript") -> list[Path]:
    t = ckpt.text
    past_names = kv_names(t.num_layers, "past_key_values")
    present_names = kv_names(t.num_layers, "present")
    axes = {"inputs_embeds": {0: "b", 1: "l"}, "attention_mask": {0: "b", 1: "s"},
            "position_ids": {0: "b", 1: "l"}, "logits": {0: "b", 1: "l"}}
    axes.update({name: {0: "b", 2: "p"} for name in past_names})
    axes.update({name: {0: "b", 2: "s"} for name in present_names})
    return export_graph(
        build_decoder(ckpt), decoder_example(t), path,
        input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
        output_names=["logits", *present_names], dynamic_axes=axes,
        force_external_data=force_external_data, exporter=exporter)


def export_embed(ckpt, path: Path, force_external_data: bool = False, exporter: str = "torchscript") -> list[Path]:
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int64)   # batch 2: dynamic batch
    axes = {"input_ids": {0: "b", 1: "l"}, "inputs_embeds": {0: "b", 1: "l"}}
    return export_graph(build_embed(ckpt), (ids,), path, input_names=["input_ids"],
                        output_names=["inputs_embeds"], dynamic_axes=axes,
                        force_external_data=force_external_data, exporter=exporter)
