"""Open an upstream Qwen2.5-VL folder (HuatuoGPT-Vision-7B-Qwen2.5VL) lazily.

What it reads, and from where:
  config.json              text dims (flat, as Qwen released it, or under text_config as
                           transformers >= 4.52 saves it), vision dims (vision_config), token ids
  preprocessor_config.json min/max_pixels (the keys win over size{}, as Qwen2VLImageProcessor does)
  generation_config.json   sampling defaults and eos ids (missing keys: families.qwen25vl's)
  chat_template.jinja / chat_template.json / tokenizer_config.json   the chat template, first found
  weights                  convert/checkpoint/files.py; names sanitized to the canonical (pre-4.52)
                           names with families.qwen25vl.LAYOUT_PREFIXES, whichever layout is stored

Canonical tensors (H text width, D vision width, V vocabulary rows):
  visual.patch_embed.proj.weight [D, 3, 2, 14, 14]; visual.blocks.{i}.{norm1,norm2}.weight [D],
  .attn.qkv.{weight [3D, D], bias}, .attn.proj, .mlp.{gate,up,down}_proj (with biases);
  visual.merger.ln_q.weight [D], visual.merger.mlp.{0 [4D, 4D], 2 [H, 4D]}.{weight, bias};
  model.embed_tokens.weight [V, H], model.layers.{i}.* (Qwen2), model.norm.weight, lm_head.weight [V, H]
  (absent when tie_word_embeddings).
Every bad input is one sentence (ModelFormatError) naming the file and what to do.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from huatuo_lite.errors import ModelFormatError
from huatuo_lite.families import config_family, qwen25vl as fam
from huatuo_lite.jsonrecords import read_json_object

from ..checkpoint.family import folder_family

from ..checkpoint.files import TensorStore, find_weights

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# Non-persistent buffers older transformers versions saved: not weights.
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")
# Geometry the runtime hard-codes (families.qwen25vl): a checkpoint must agree.
FIXED_VISION = {"patch_size": fam.PATCH_SIZE, "spatial_merge_size": fam.MERGE_SIZE,
                "temporal_patch_size": fam.TEMPORAL_PATCH_SIZE}


@dataclass(frozen=True)
class QwenText:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int                 # embedding rows (> tokenizer size)
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple            # (time, row, col) rotary pairs, sum = head_dim / 2
    max_position_embeddings: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class QwenVision:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int            # = text hidden_size
    fullatt_block_indexes: tuple    # layers with full attention; the others attend in windows
    window_size: int                # px
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    tokens_per_second: int


@dataclass(frozen=True)
class TokenIds:
    image: int                      # <|image_pad|>
    video: int | None
    vision_start: int
    vision_end: int


# ----------------------------------------------------------- recognition ----
def declares_qwen25vl(config: dict) -> bool:
    return config_family(config) == fam.NAME


def is_qwen25vl(root) -> bool:
    """Whether the folder's config.json declares Qwen2.5-VL (converters route it here)."""
    return folder_family(root) == fam.NAME


# ---------------------------------------------------------------- config ----
def _need(section: dict, key: str, where: str):
    if key not in section or section[key] is None:
        raise ModelFormatError(f"{where} has no {key!r}, which a Qwen2.5-VL config must give; "
                               "the file is incomplete, re-download it.")
    return section[key]


def _text_section(config: dict) -> dict:
    """The text keys: text_config over the flat keys (4.57 writes both, and they agree)."""
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def text_facts(config: dict, where: str) -> QwenText:
    t = _text_section(config)
    hidden, heads = int(_need(t, "hidden_size", where)), int(_need(t, "num_attention_heads", where))
    rope = t.get("rope_scaling") or t.get("rope_parameters") or {}
    section = tuple(int(x) for x in _need(rope, "mrope_section", f"{where} rope_scaling"))
    head_dim = hidden // heads
    if sum(section) * 2 != head_dim:
        raise ModelFormatError(f"{where}: rope_scaling mrope_section {list(section)} covers {2 * sum(section)} of "
                               f"the {head_dim} head dimensions; the config is inconsistent, re-download it.")
    return QwenText(hidden, int(_need(t, "intermediate_size", where)), int(_need(t, "num_hidden_layers", where)),
                    heads, int(t.get("num_key_value_heads") or heads), head_dim, int(_need(t, "vocab_size", where)),
                    float(t.get("rms_norm_eps", 1e-6)), float(t.get("rope_theta", 1000000.0)), section,
                    int(t.get("max_position_embeddings", 128000)),
                    bool(config.get("tie_word_embeddings", t.get("tie_word_embeddings", False))))


def vision_facts(config: dict, where: str) -> QwenVision:
    v = config.get("vision_config")
    if not isinstance(v, dict):
        raise ModelFormatError(f"{where} has no vision_config, which a Qwen2.5-VL config must give; "
                               "the file is incomplete, re-download it.")
    where_v = f"{where} vision_config"
    for key, want in FIXED_VISION.items():
        if int(v.get(key, want)) != want:
            raise ModelFormatError(f"{where_v} sets {key} {v[key]}, but Qwen2.5-VL checkpoints use {want}; "
                                   "this model is not supported.")
    return QwenVision(int(_need(v, "depth", where_v)), int(_need(v, "hidden_size", where_v)),
                      int(_need(v, "intermediate_size", where_v)), int(_need(v, "num_heads", where_v)),
                      int(_need(v, "out_hidden_size", where_v)),
                      tuple(int(i) for i in _need(v, "fullatt_block_indexes", where_v)),
                      int(v.get("window_size", 112)), fam.PATCH_SIZE, fam.MERGE_SIZE, fam.TEMPORAL_PATCH_SIZE,
                      int(v.get("tokens_per_second", 2)))


def token_ids(config: dict, where: str) -> TokenIds:
    t = _text_section(config)
    video = t.get("video_token_id")
    return TokenIds(int(_need(t, "image_token_id", where)), None if video is None else int(video),
                    int(_need(t, "vision_start_token_id", where)), int(_need(t, "vision_end_token_id", where)))


# ------------------------------------------------------------ side files ----
def image_pixels(root: Path) -> tuple[int, int]:
    """(min_pixels, max_pixels) from preprocessor_config.json: its min/max_pixels keys,
    else size{shortest_edge, longest_edge} (Qwen2VLImageProcessor's precedence)."""
    path = root / "preprocessor_config.json"
    if not path.is_file():
        raise ModelFormatError(f"{root} has no preprocessor_config.json (the image size bounds); copy it from "
                               "the base model Qwen2.5-VL-7B-Instruct or re-download the checkpoint.")
    data = read_json_object(path, "re-download it", ModelFormatError)
    size = data.get("size") if isinstance(data.get("size"), dict) else {}
    low = data.get("min_pixels", size.get("shortest_edge", fam.MIN_PIXELS))
    high = data.get("max_pixels", size.get("longest_edge", fam.MAX_PIXELS))
    if not (isinstance(low, int) and isinstance(high, int) and 0 < low <= high):
        raise ModelFormatError(f"{path} gives min_pixels {low!r} and max_pixels {high!r}; they must be whole "
                               "numbers with 0 < min_pixels <= max_pixels, fix or re-download it.")
    return low, high


def generation_facts(root: Path, config: dict) -> tuple:
    """(GenerationConfig, eos ids) from generation_config.json (what HF generate uses);
    do_sample false there means greedy (temperature 0). eos: its ids, else config.json's."""
    path = root / "generation_config.json"
    data = read_json_object(path, "re-download it", ModelFormatError) if path.is_file() else {}
    d = fam.GENERATION_DEFAULTS
    greedy = data.get("do_sample") is False
    gen = replace(d, temperature=0.0 if greedy else float(data.get("temperature", d.temperature)),
                  top_p=float(data.get("top_p", d.top_p)), top_k=int(data.get("top_k", d.top_k)),
                  repetition_penalty=float(data.get("repetition_penalty", d.repetition_penalty)),
                  max_new_tokens=int(data.get("max_new_tokens", d.max_new_tokens)))
    eos = data.get("eos_token_id", _text_section(config).get("eos_token_id"))
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return gen, frozenset(int(i) for i in ids)


def chat_template(root: Path) -> str | None:
    """The checkpoint's own template: chat_template.jinja, chat_template.json, then
    tokenizer_config.json (where the transformers versions put it)."""
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (root / name).is_file():
            template = read_json_object(root / name, "re-download it", ModelFormatError).get("chat_template")
            if isinstance(template, str):
                return template
    return None


# --------------------------------------------------------------- tensors ----
def _linear(prefix: str, out_f: int, in_f: int, bias: bool) -> list:
    spec = [(prefix + ".weight", (out_f, in_f), "w")]
    return spec + ([(prefix + ".bias", (out_f,), "b")] if bias else [])


def expected_tensors(text: QwenText, vision: QwenVision) -> list:
    """[(canonical name, shape, kind "w"|"b"|"norm")] in state-dict order (vision first)."""
    d, inter = vision.hidden_size, vision.intermediate_size
    merged = d * vision.spatial_merge_size ** 2
    p = vision.patch_size
    spec = [("visual.patch_embed.proj.weight", (d, 3, vision.temporal_patch_size, p, p), "w")]
    for i in range(vision.depth):
        b = f"visual.blocks.{i}."
        spec += [(b + "norm1.weight", (d,), "norm"), (b + "norm2.weight", (d,), "norm")]
        spec += _linear(b + "attn.qkv", 3 * d, d, True) + _linear(b + "attn.proj", d, d, True)
        spec += _linear(b + "mlp.gate_proj", inter, d, True) + _linear(b + "mlp.up_proj", inter, d, True)
        spec += _linear(b + "mlp.down_proj", d, inter, True)
    spec += [("visual.merger.ln_q.weight", (d,), "norm")]
    spec += _linear("visual.merger.mlp.0", merged, merged, True)
    spec += _linear("visual.merger.mlp.2", vision.out_hidden_size, merged, True)
    h, kv = text.hidden_size, text.num_kv_heads * text.head_dim
    spec += [("model.embed_tokens.weight", (text.vocab_size, h), "w")]
    for i in range(text.num_layers):
        b = f"model.layers.{i}."
        spec += _linear(b + "self_attn.q_proj", text.num_heads * text.head_dim, h, True)
        spec += _linear(b + "self_attn.k_proj", kv, h, True) + _linear(b + "self_attn.v_proj", kv, h, True)
        spec += _linear(b + "self_attn.o_proj", h, text.num_heads * text.head_dim, False)
        spec += _linear(b + "mlp.gate_proj", text.intermediate_size, h, False)
        spec += _linear(b + "mlp.up_proj", text.intermediate_size, h, False)
        spec += _linear(b + "mlp.down_proj", h, text.intermediate_size, False)
        spec += [(b + "input_layernorm.weight", (h,), "norm"), (b + "post_attention_layernorm.weight", (h,), "norm")]
    spec += [("model.norm.weight", (h,), "norm")]
    return spec + ([] if text.tie_word_embeddings else [("lm_head.weight", (text.vocab_size, h), "w")])


def _layout(stored: dict, root: Path) -> str:
    """The layout whose prefixes name every stored tensor: the newer one when its
    distinctive prefixes appear (model.visual. / model.language_model.)."""
    newer = fam.LAYOUT_PREFIXES["from-4.52"]
    distinctive = tuple(prefix for prefix, _ in newer if prefix != "lm_head.")
    layout = "from-4.52" if any(n.startswith(distinctive) for n in stored) else "before-4.52"
    prefixes = tuple(prefix for prefix, _ in fam.LAYOUT_PREFIXES[layout])
    stray = next((n for n in stored if not n.startswith(prefixes)), None)
    if stray is not None:
        raise ModelFormatError(f"{root} holds the tensor {stray}, which is not named like a Qwen2.5-VL weight "
                               f"(prefixes {', '.join(prefixes)}); the weights do not belong to this config.json.")
    return layout


def canonical_name(stored: str, layout: str) -> str:
    for prefix, canon in fam.LAYOUT_PREFIXES[layout]:     # longest prefix first
        if stored.startswith(prefix):
            return canon + stored[len(prefix):]
    return stored


def _check_tensors(entries: dict, spec: list, root: Path) -> None:
    """Every tensor the config needs is there with its shape; nothing else is."""
    wanted = {name: shape for name, shape, _ in spec}
    missing = [n for n in wanted if n not in entries]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFormatError(f"{root} is missing the tensor {missing[0]}{more} that its config.json needs; the "
                               "download is incomplete or the weights were renamed, re-download them.")
    extra = next((n for n in entries if n not in wanted), None)
    if extra is not None:
        raise ModelFormatError(f"{root} holds the tensor {extra}, which its config.json's model does not have; "
                               "the weights and config.json do not belong together, re-download them.")
    odd = next((n for n, shape in wanted.items() if tuple(entries[n].shape) != shape), None)
    if odd is not None:
        raise ModelFormatError(f"{root}: the tensor {odd} has shape {list(entries[odd].shape)} but config.json "
                               f"implies {list(wanted[odd])}; the weights and config.json do not belong together.")


class QwenCheckpoint(TensorStore):
    """An upstream Qwen2.5-VL folder. Attributes: root, config (raw config.json), layout
    ("before-4.52" | "from-4.52"), text, vision, ids (TokenIds), image_pixels (min, max),
    generation (families' GenerationConfig), eos_token_ids, chat_template (str | None), tokenizer_dir.
    names() canonical; shape(name), dtype(name), get(name) -> torch.Tensor (stored dtype);
    iter_tensors(prefix="") -> (canonical name, tensor) one file at a time (safetensors are mmapped)."""

    variant = fam.VARIANT

    def __init__(self, root: Path, config: dict, layout: str, entries: dict, **facts):
        self.root, self.config, self.layout, self._entries = root, config, layout, entries
        for key, value in facts.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return f"QwenCheckpoint({str(self.root)!r}, layout={self.layout!r}, tensors={len(self._entries)})"


def open_qwen25vl(path, allow_pickle: bool = False) -> QwenCheckpoint:
    """Open and validate a Qwen2.5-VL folder (config and tensor headers only); one sentence
    (ModelFormatError) for anything wrong with it."""
    root = Path(path).expanduser()
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ModelFormatError(f"{root} is not a model folder: no config.json (point at the folder that holds "
                               "config.json and the *.safetensors files).")
    config = read_json_object(config_path, "re-download it", ModelFormatError)
    if not declares_qwen25vl(config):
        archs = config.get("architectures") or [None]
        raise ModelFormatError(f"{config_path} declares {archs[0]!r} (model_type {config.get('model_type')!r}), "
                               f"not {fam.VARIANT.architecture}; open it as a HuatuoGPT-Vision LLaVA checkpoint.")
    text, vision = text_facts(config, str(config_path)), vision_facts(config, str(config_path))
    if vision.out_hidden_size != text.hidden_size:
        raise ModelFormatError(f"{config_path}: vision_config out_hidden_size {vision.out_hidden_size} differs from "
                               f"the text hidden_size {text.hidden_size}; the config is inconsistent, re-download it.")
    stored = {n: e for n, e in find_weights(root, allow_pickle).items() if not n.endswith(BUFFER_SUFFIXES)}
    layout = _layout(stored, root)
    entries = {canonical_name(n, layout): e for n, e in stored.items()}
    _check_tensors(entries, expected_tensors(text, vision), root)
    generation, eos = generation_facts(root, config)
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise ModelFormatError(f"{root} has no tokenizer (tokenizer.json or vocab.json + merges.txt); "
                               "copy the tokenizer files from the base model or re-download the checkpoint.")
    return QwenCheckpoint(root, config, layout, entries, text=text, vision=vision,
                          ids=token_ids(config, str(config_path)), image_pixels=image_pixels(root),
                          generation=generation, eos_token_ids=eos, chat_template=chat_template(root),
                          tokenizer_dir=root)


__all__ = ["QwenCheckpoint", "QwenText", "QwenVision", "TokenIds", "open_qwen25vl", "is_qwen25vl",
           "declares_qwen25vl", "expected_tensors", "canonical_name"]
