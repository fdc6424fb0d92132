"""Read an upstream HuatuoGPT-Vision folder lazily and yield canonical tensors.

Canonical tensor names are the upstream 7B ("llava" layout) names, whatever the
variant:

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

The -hf layouts (2024: language_model.model.*, multi_modal_projector.linear_{1,2},
vision_tower.vision_model.*; transformers >= 4.52: model.language_model.*,
model.multi_modal_projector.*, model.vision_tower.*, lm_head) are renamed with the
prefix tables below. The variant comes from config.json (architectures, else
model_type) and must agree with the tensor names; never from the folder name.
Dimensions: convert/checkpoint/dims.py. Weight files: convert/checkpoint/files.py.
"""
from __future__ import annotations

from pathlib import Path

from huatuo_lite.errors import ModelFormatError
from huatuo_lite.families.llava import VARIANT_BY_ARCHITECTURE, VARIANTS
from huatuo_lite.families.text import HF_DEFAULT_TEXT_TYPE, TEXT_ARCHS

from .dims import (HF_PROJECTOR_KINDS, PROJECTOR_PREFIX, VISION_PREFIX, ProjectorConfig,
                              TextConfig, VisionConfig, check_widths, projector_config,
                              read_vit_config, text_config, vision_config)
from .files import TensorStore, find_weights
from huatuo_lite.jsonrecords import read_json_object

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
# The embedding's stored name tells the layout: marker -> (family.Variant.layout, prefix table).
STORED_LAYOUTS = {
    "model.embed_tokens.weight": ("llava", {}),
    "language_model.model.embed_tokens.weight": ("hf", HF_OLD_PREFIXES),
    "model.language_model.embed_tokens.weight": ("hf", HF_NEW_PREFIXES),
}
VARIANT_BY_MODEL_TYPE = {v.model_type: v for v in VARIANTS.values()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# Non-persistent buffers that older transformers versions saved: not weights.
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


def _swap_prefix(name: str, table: dict) -> str | None:
    for old, new in table.items():
        if name.startswith(old):
            return new + name[len(old):]
    return None


def to_hf_name(canonical: str, table: dict = HF_OLD_PREFIXES) -> str:
    """Canonical name -> its name in a -hf checkpoint (2024 layout by default)."""
    return _swap_prefix(canonical, table)


def to_canonical_name(stored: str, table: dict) -> str:
    """Stored -hf name -> canonical name (unknown names are kept as they are)."""
    inverse = {new: old for old, new in sorted(table.items(), key=lambda kv: -len(kv[1]))}
    return _swap_prefix(stored, inverse) or stored


class Checkpoint(TensorStore):
    """An upstream model folder. Attributes: root, variant (family.Variant),
    config (raw config.json dict), text, vision, projector, tokenizer_dir.

    names() -> list[str] canonical names; shape(name) -> tuple; dtype(name) -> str
    ("bfloat16", ...); get(name) -> torch.Tensor in the stored dtype;
    iter_tensors(prefix="") yields (canonical_name, tensor) shard by shard so peak
    memory stays near one shard (one tensor for safetensors, which is mmapped).
    """

    def __init__(self, root: Path, variant, config: dict, entries: dict, text: TextConfig,
                 vision: VisionConfig, projector: ProjectorConfig, tokenizer_dir: Path | None):
        self.root, self.variant, self.config = root, variant, config
        self.text, self.vision, self.projector = text, vision, projector
        self.tokenizer_dir = tokenizer_dir
        self._entries = entries            # canonical name -> TensorEntry, in file order

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.root)!r}, variant={self.variant.name!r}, tensors={len(self._entries)})"


# ------------------------------------------------------------- detection ----
def _read_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"{root} is not a model folder: no config.json (point at the folder "
                               "that holds config.json and the *.safetensors files).")
    return read_json_object(path, "re-download it", ModelFormatError)


def _variant(config: dict, root: Path):
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    variant = next((VARIANT_BY_ARCHITECTURE[a] for a in archs if a in VARIANT_BY_ARCHITECTURE), None)
    if variant is None and not archs:
        variant = VARIANT_BY_MODEL_TYPE.get(model_type)
    if variant is None:
        supported = ", ".join(f"{v.architecture} ({v.model_type})" for v in VARIANTS.values())
        raise ModelFormatError(f"{root}/config.json declares architecture {archs[0] if archs else None!r} "
                               f"(model_type {model_type!r}), which is not a supported HuatuoGPT-Vision "
                               f"layout; supported are {supported}.")
    return variant


def _layout(variant, stored: dict, root: Path) -> dict:
    """The prefix table for the stored names; they must match the config's layout."""
    found = [(layout, table) for marker, (layout, table) in STORED_LAYOUTS.items() if marker in stored]
    if not found:
        raise ModelFormatError(f"{root} has no token embedding tensor ({' or '.join(STORED_LAYOUTS)}): "
                               "it is not a HuatuoGPT-Vision checkpoint or its weights are incomplete.")
    layout, table = found[0]
    if layout != variant.layout:
        raise ModelFormatError(f"{root}/config.json declares {variant.architecture} but the tensors are named "
                               f"like a {layout!r}-layout checkpoint; the config and the weights do not belong together.")
    return table


def _text_part(variant, config: dict, root: Path) -> tuple:
    """(TextConfig.arch, the config dict holding the LLM's keys)."""
    if variant.layout == "llava":
        return variant.text_arch, config
    text = config.get("text_config") or {}
    model_type = text.get("model_type", HF_DEFAULT_TEXT_TYPE)
    if model_type not in TEXT_ARCHS:     # text_config.model_type is TextArch.name
        raise ModelFormatError(f"{root}/config.json has a {model_type!r} text model; only "
                               f"{', '.join(TEXT_ARCHS)} are supported.")
    return TEXT_ARCHS[model_type].name, text


def _vision_part(variant, config: dict, root: Path) -> tuple:
    """(vision config dict, select layer, projector kind, mm_hidden_size) per layout."""
    if variant.layout == "llava":
        return (read_vit_config(root), config.get("mm_vision_select_layer"),
                config.get("mm_projector_type", "mlp2x_gelu"), config.get("mm_hidden_size"))
    act = config.get("projector_hidden_act", "gelu")
    return (config.get("vision_config") or {}, config.get("vision_feature_layer"),
            HF_PROJECTOR_KINDS.get(act, act), None)


# ------------------------------------------------------------ validation ----
def required_names(text: TextConfig, vision: VisionConfig) -> list[str]:
    """Every canonical tensor the model needs (post_layernorm is optional: the
    features come from hidden_states[-2], before it)."""
    qkv_parts = ("weight", "bias") if text.attention_bias else ("weight",)
    names = ["model.embed_tokens.weight"]
    for i in range(text.num_layers):
        p = f"model.layers.{i}."
        names += [f"{p}self_attn.{m}_proj.{part}" for m in "qkv" for part in qkv_parts]
        names += [p + n + ".weight" for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                              "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    names += ["model.norm.weight"] + ([] if text.tie_word_embeddings else ["lm_head.weight"])
    names += [PROJECTOR_PREFIX + f"{i}.{part}" for i in (0, 2) for part in ("weight", "bias")]
    v = VISION_PREFIX
    names += [v + "embeddings.class_embedding", v + "embeddings.patch_embedding.weight",
              v + "embeddings.position_embedding.weight", v + "pre_layrnorm.weight", v + "pre_layrnorm.bias"]
    modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
    for j in range(vision.num_layers):
        names += [f"{v}encoder.layers.{j}.{m}.{part}" for m in modules for part in ("weight", "bias")]
    return names


def _check_complete(entries: dict, text: TextConfig, vision: VisionConfig, root: Path) -> None:
    missing = [n for n in required_names(text, vision) if n not in entries]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFormatError(f"{root} is missing the tensor {missing[0]}{more}: the download is "
                               "incomplete or the weights do not match config.json.")


# ------------------------------------------------------------------- API ----
def open_checkpoint(path, allow_pickle: bool = False) -> Checkpoint:
    """Open and validate a folder; HuatuoError/ModelFormatError in one sentence if not.

    Reads config.json and the tensor headers only; tensors load on demand.
    allow_pickle=True accepts a pytorch_model.bin checkpoint (pickle can run code).
    """
    root = Path(path).expanduser()
    config = _read_config(root)
    variant = _variant(config, root)
    stored = find_weights(root, allow_pickle)                   # stored name -> TensorEntry
    table = _layout(variant, stored, root)
    entries = {to_canonical_name(n, table) if table else n: e for n, e in stored.items()
               if not n.endswith(BUFFER_SUFFIXES)}
    shapes = {n: e.shape for n, e in entries.items()}
    arch, text_cfg = _text_part(variant, config, root)
    vit_cfg, select_layer, kind, mm_hidden = _vision_part(variant, config, root)
    projector = projector_config(kind, shapes, root)
    text = text_config(arch, text_cfg, shapes, root)
    vision = vision_config(vit_cfg, select_layer, shapes, root)
    check_widths(mm_hidden, text, vision, projector, root)
    _check_complete(entries, text, vision, root)
    tokenizer_dir = root if any((root / f).is_file() for f in TOKENIZER_FILES) else None
    return Checkpoint(root, variant, config, entries, text, vision, projector, tokenizer_dir)


__all__ = ["Checkpoint", "TextConfig", "VisionConfig", "ProjectorConfig", "open_checkpoint",
           "VISION_PREFIX", "PROJECTOR_PREFIX", "HF_OLD_PREFIXES", "HF_NEW_PREFIXES",
           "to_hf_name", "to_canonical_name", "required_names"]
