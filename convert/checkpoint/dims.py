"""Model dimensions of an upstream checkpoint, from its config.json and tensor shapes.

Shapes win where they can decide (hidden widths, layer counts, vocabulary rows,
biases); the config supplies what shapes cannot tell (head counts, rope base,
eps, token ids). Config keys missing from a terse -hf `text_config` fall back to
transformers' defaults for that model type, as transformers itself would
(families/text.py: TextArch.missing_key_defaults).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from huatuo_lite.errors import ModelFormatError
from huatuo_lite.families.llava import VISION_SELECT_LAYER
from huatuo_lite.families.text import TEXT_ARCHS
from huatuo_lite.jsonrecords import read_json_object

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
VIT_CONFIG = "vit/clip_vit_large_patch14_336/config.json"   # mm_vision_tower upstream
SUPPORTED_PROJECTORS = ("mlp2x_gelu",)
HF_PROJECTOR_KINDS = {"gelu": "mlp2x_gelu"}                 # projector_hidden_act -> kind

# CLIP ViT-L/14 defaults for what the embedded tensors cannot tell.
CLIP_HEAD_DIM = 64
CLIP_DEFAULTS = {"layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}


@dataclass(frozen=True)
class TextConfig:
    arch: str                  # a families.text.TEXT_ARCHS key
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


def count_layers(shapes: dict, prefix: str) -> int:
    """Number of distinct `{prefix}{i}.` blocks among the canonical names."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for name in shapes if (m := pattern.match(name))}
    return max(found) + 1 if found else 0


def _first_id(value):
    """eos_token_id may be a list in some configs: the first one is the id."""
    return value[0] if isinstance(value, list) and value else value


def _need(shapes: dict, name: str, root) -> tuple:
    if name not in shapes:
        raise ModelFormatError(f"{root} is missing the tensor {name}: the download is incomplete "
                               "or this is not a HuatuoGPT-Vision checkpoint.")
    return shapes[name]


def _rope_theta(cfg: dict) -> dict:
    """{"rope_theta": ...} from transformers 5's `rope_parameters` when the top-level key
    (transformers 4) is absent, so that the base is not the class default; else {}."""
    rope = cfg.get("rope_parameters")
    if "rope_theta" in cfg or not isinstance(rope, dict) or rope.get("rope_theta") is None:
        return {}
    return {"rope_theta": rope["rope_theta"]}


def text_config(arch: str, cfg: dict, shapes: dict, root) -> TextConfig:
    """cfg: the text part of config.json (the whole file for llava layouts)."""
    get = {**TEXT_ARCHS[arch].missing_key_defaults, **cfg, **_rope_theta(cfg)}.get
    rows, hidden = _need(shapes, "model.embed_tokens.weight", root)
    heads = int(get("num_attention_heads"))
    head_dim = int(get("head_dim") or hidden // heads)
    kv_rows = _need(shapes, "model.layers.0.self_attn.k_proj.weight", root)[0]
    layers = cfg.get("num_hidden_layers") or count_layers(shapes, "model.layers.")
    return TextConfig(
        arch=arch, hidden_size=hidden,
        intermediate_size=_need(shapes, "model.layers.0.mlp.gate_proj.weight", root)[0],
        num_layers=int(layers), num_heads=heads, num_kv_heads=kv_rows // head_dim,
        vocab_size=rows, rope_theta=float(get("rope_theta")), rms_norm_eps=float(get("rms_norm_eps")),
        max_position_embeddings=int(get("max_position_embeddings")),
        attention_bias="model.layers.0.self_attn.q_proj.bias" in shapes,
        tie_word_embeddings=bool(get("tie_word_embeddings")) and "lm_head.weight" not in shapes,
        bos_token_id=_first_id(get("bos_token_id")), eos_token_id=_first_id(get("eos_token_id")),
        pad_token_id=_first_id(get("pad_token_id")))


def read_vit_config(root: Path) -> dict:
    """vision_config of the vit/ CLIP copy, or {} when there is none."""
    path = root / VIT_CONFIG
    if not path.is_file():
        return {}
    data = read_json_object(path, "re-download the vit/ folder", ModelFormatError)
    return data.get("vision_config", data)


def vision_config(vit_cfg: dict, select_layer, shapes: dict, root) -> VisionConfig:
    """Dims from the embedded tower's shapes; heads/eps/act from its config when
    that config describes a tower of the same width, else CLIP defaults."""
    p = VISION_PREFIX
    width, _, patch, _ = _need(shapes, p + "embeddings.patch_embedding.weight", root)
    positions = _need(shapes, p + "embeddings.position_embedding.weight", root)[0]
    side = round((positions - 1) ** 0.5)      # positions = (S/P)^2 + 1 (class token)
    same_tower = vit_cfg.get("hidden_size") == width
    get = {**CLIP_DEFAULTS, **(vit_cfg if same_tower else {})}.get
    return VisionConfig(
        hidden_size=width,
        intermediate_size=_need(shapes, p + "encoder.layers.0.mlp.fc1.weight", root)[0],
        num_layers=count_layers(shapes, p + "encoder.layers."),
        num_heads=int(get("num_attention_heads") or width // CLIP_HEAD_DIM),
        image_size=side * patch, patch_size=patch,
        layer_norm_eps=float(get("layer_norm_eps")),
        select_layer=int(VISION_SELECT_LAYER if select_layer is None else select_layer),
        hidden_act=str(get("hidden_act")))


def projector_config(kind: str, shapes: dict, root) -> ProjectorConfig:
    if not any(name.startswith(PROJECTOR_PREFIX) for name in shapes):
        raise ModelFormatError(f"{root} has no projector tensors (model.mm_projector.* or "
                               "multi_modal_projector.*): it is a text-only model, not HuatuoGPT-Vision.")
    if kind not in SUPPORTED_PROJECTORS:
        raise ModelFormatError(f"{root} uses the projector type {kind!r}; only "
                               f"{', '.join(SUPPORTED_PROJECTORS)} (HuatuoGPT-Vision's) is supported.")
    out_f, in_f = _need(shapes, PROJECTOR_PREFIX + "0.weight", root)
    return ProjectorConfig(kind=kind, in_features=in_f, out_features=out_f)


def check_widths(mm_hidden_size, text: TextConfig, vision: VisionConfig,
                 proj: ProjectorConfig, root) -> None:
    """The three widths that must meet: CLIP -> projector -> LLM."""
    if mm_hidden_size is not None and int(mm_hidden_size) != vision.hidden_size:
        raise ModelFormatError(f"{root}/config.json says mm_hidden_size {mm_hidden_size} but the vision "
                               f"tower is {vision.hidden_size} wide: the config does not belong to these weights.")
    if proj.in_features != vision.hidden_size or proj.out_features != text.hidden_size:
        raise ModelFormatError(f"{root}: the projector maps {proj.in_features} -> {proj.out_features} but the "
                               f"vision tower is {vision.hidden_size} wide and the LLM {text.hidden_size}: "
                               "the checkpoint is inconsistent.")
