"""The text architectures HuatuoGPT-Vision's LLMs use: every per-architecture fact, once.

Plain data (no torch, no gguf, no transformers import): the converters keep their
mechanisms (the GGUF writer, the config readers, the tiny-checkpoint builder, the torch
reference) and look the facts up here by `TextConfig.arch` / `Variant.text_arch`.

Two tables of config values, because they answer different questions:
- `missing_key_defaults`: what a key that a config.json leaves out means. transformers'
  Qwen2Config / LlamaConfig defaults, as transformers itself would fill them (a terse
  -hf `text_config`).
- `upstream_config`: what upstream's config.json actually says (the 7B's Qwen2 and the
  34B's Yi values, minus sizes and token ids): written into the tiny checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class TextArch:
    name: str                 # TextConfig.arch == text_config.model_type: "qwen2" | "llama"
    hf_architecture: str      # text_config.architectures[0] in an -hf config.json
    gguf_arch: str            # gguf.MODEL_ARCH member name (the gguf package resolves it)
    # llama.cpp's LLAMA rope is the interleaved kind, QWEN2's the NEOX (half-split) kind, as in HF:
    # True -> q_proj rows [num_heads*D, H] and k_proj rows [num_kv_heads*D, H] are permuted per head.
    permute_qk: bool
    vocab: str                # "bpe" (byte-level BPE, tokenizer.json) | "spm" (SentencePiece tokenizer.model)
    gguf_tokenizer: str       # tokenizer.ggml.model: "gpt2" (byte-level BPE) | "llama" (SentencePiece)
    gguf_pre: str             # tokenizer.ggml.pre: llama.cpp's pre-tokenizer regex set
    qkv_bias: bool            # q/k/v_proj carry [out] biases in upstream's weights
    config_class: str         # the transformers config class of the torch reference
    # constant kwargs of config_class (beyond the sizes); reference_bias_kwarg: the kwarg that
    # takes the checkpoint's own q/k/v-bias flag (None: the class always has the biases)
    reference_kwargs: MappingProxyType
    reference_bias_kwarg: str | None
    missing_key_defaults: MappingProxyType
    upstream_config: MappingProxyType
    # upstream config keys whose value is the layer count (Qwen2's max_window_layers)
    upstream_layer_keys: tuple = field(default_factory=tuple)


def _frozen(**values) -> MappingProxyType:
    return MappingProxyType(dict(values))


QWEN2 = TextArch(
    name="qwen2", hf_architecture="Qwen2ForCausalLM", gguf_arch="QWEN2",
    permute_qk=False, vocab="bpe", gguf_tokenizer="gpt2", gguf_pre="qwen2", qkv_bias=True,
    config_class="Qwen2Config", reference_kwargs=_frozen(use_sliding_window=False), reference_bias_kwarg=None,
    missing_key_defaults=_frozen(num_attention_heads=32, rope_theta=10000.0, rms_norm_eps=1e-6,
                                 max_position_embeddings=32768, tie_word_embeddings=False),
    # HuatuoGPT-Vision-7B (Qwen2-7B)
    upstream_config=_frozen(attention_dropout=0.0, hidden_act="silu", initializer_range=0.02,
                            max_position_embeddings=32768, rms_norm_eps=1e-06, rope_theta=1000000.0,
                            sliding_window=131072, tie_word_embeddings=False, use_cache=True,
                            use_sliding_window=False),
    upstream_layer_keys=("max_window_layers",),
)
LLAMA = TextArch(
    name="llama", hf_architecture="LlamaForCausalLM", gguf_arch="LLAMA",
    permute_qk=True, vocab="spm", gguf_tokenizer="llama", gguf_pre="default", qkv_bias=False,
    config_class="LlamaConfig", reference_kwargs=_frozen(mlp_bias=False), reference_bias_kwarg="attention_bias",
    missing_key_defaults=_frozen(num_attention_heads=32, rope_theta=10000.0, rms_norm_eps=1e-6,
                                 max_position_embeddings=2048, tie_word_embeddings=False),
    # HuatuoGPT-Vision-34B (Yi-1.5-34B)
    upstream_config=_frozen(attention_bias=False, attention_dropout=0.0, hidden_act="silu",
                            initializer_range=0.02, max_position_embeddings=4096, pretraining_tp=1,
                            rms_norm_eps=1e-06, rope_scaling=None, rope_theta=5000000.0,
                            tie_word_embeddings=False, use_cache=True),
)

TEXT_ARCHS = {a.name: a for a in (QWEN2, LLAMA)}
HF_DEFAULT_TEXT_TYPE = LLAMA.name     # LlavaConfig's default text_config when model_type is absent
