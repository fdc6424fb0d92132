"""Read an upstream HuatuoGPT-Vision folder lazily and yield canonical tensors.

INTERFACE STUB (being implemented). Canonical tensor names are the upstream 7B
("llava" layout) names, whatever the variant:

  model.embed_tokens.weight                    [V, H]
  model.layers.{i}.input_layernorm.weight      [H]
  model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}   (bias only for qwen2)
  model.layers.{i}.self_attn.o_proj.weight
  model.layers.{i}.post_attention_layernorm.weight
  model.layers.{i}.mlp.{gate,up,down}_proj.weight
  model.norm.weight                            [H]
  lm_head.weight                               [V, H]   (absent when tied)
  model.mm_projector.0.{weight,bias}           [H, Dv], [H]
  model.mm_projector.2.{weight,bias}           [H, H], [H]
  model.vision_tower.vision_tower.vision_model.{embeddings.class_embedding [Dv],
      embeddings.patch_embedding.weight [Dv, 3, 14, 14],
      embeddings.position_embedding.weight [577, Dv], pre_layrnorm.{weight,bias},
      encoder.layers.{j}.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2,
      mlp.fc1, mlp.fc2}.{weight,bias}, post_layernorm.{weight,bias}}
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."

# Canonical prefix -> prefix in the -hf layouts. Old: transformers < 4.52 (the
# 2024 -hf conversion); new: transformers >= 4.52 (save_pretrained today).
# Longest canonical prefixes first so that "model.mm_projector." wins over "model.".
HF_OLD_PREFIXES = {
    VISION_PREFIX: "vision_tower.vision_model.",
    PROJECTOR_PREFIX + "0.": "multi_modal_projector.linear_1.",
    PROJECTOR_PREFIX + "2.": "multi_modal_projector.linear_2.",
    "lm_head.": "language_model.lm_head.",
    "model.": "language_model.model.",
}
HF_NEW_PREFIXES = {
    VISION_PREFIX: "model.vision_tower.vision_model.",
    PROJECTOR_PREFIX + "0.": "model.multi_modal_projector.linear_1.",
    PROJECTOR_PREFIX + "2.": "model.multi_modal_projector.linear_2.",
    "lm_head.": "lm_head.",
    "model.": "model.language_model.",
}


def _swap_prefix(name: str, table: dict) -> str | None:
    for old, new in table.items():
        if name.startswith(old):
            return new + name[len(old):]
    return None


def to_hf_name(canonical: str, table: dict = HF_OLD_PREFIXES) -> str:
    """Canonical name -> its name in a -hf checkpoint (2024 layout by default)."""
    return _swap_prefix(canonical, table)


@dataclass(frozen=True)
class TextConfig:
    arch: str                  # "qwen2" or "llama"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int            # embedding rows
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    attention_bias: bool       # q/k/v bias (qwen2: True)
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int           # Dv, 1024 for CLIP-L
    intermediate_size: int
    num_layers: int            # layers in the checkpoint (24 for CLIP-L)
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    select_layer: int          # -2
    hidden_act: str            # "quick_gelu"


@dataclass(frozen=True)
class ProjectorConfig:
    kind: str                  # "mlp2x_gelu"
    in_features: int           # mm_hidden_size == VisionConfig.hidden_size
    out_features: int          # TextConfig.hidden_size


class Checkpoint:
    """An upstream model folder. Attributes: root, variant (family.Variant),
    config (raw config.json dict), text, vision, projector, tokenizer_dir.

    names() -> list[str] canonical names; shape(name) -> tuple; dtype(name) -> str;
    get(name) -> torch.Tensor in the stored dtype; iter_tensors(prefix="") yields
    (canonical_name, tensor) shard by shard so peak memory stays near one tensor.
    """

    root: Path

    def names(self) -> list[str]: ...
    def get(self, name: str): ...
    def iter_tensors(self, prefix: str = "") -> Iterator: ...


def open_checkpoint(path) -> Checkpoint:
    """Open and validate a folder; HuatuoError/ModelFormatError in one sentence if not."""
    raise NotImplementedError
