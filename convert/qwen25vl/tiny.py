"""A tiny, format-exact HuatuoGPT-Vision-7B-Qwen2.5VL folder for tests.

Laid out like the hub repository (a standard Qwen2.5-VL-7B-Instruct fine-tune), only
small and with random weights:

  config.json                  Qwen2.5-VL-7B-Instruct's key set; "before-4.52": flat, as Qwen
                               released it (rope_scaling type "mrope"); "from-4.52": as
                               transformers 4.57 saves it (flat keys + nested text_config,
                               rope_scaling type "default" + mrope_section)
  generation_config.json       Qwen2.5-VL-7B-Instruct's sampling values
  preprocessor_config.json     Qwen2VLImageProcessor, min/max_pixels as the real one (3136 / 12845056)
  chat_template.json           Qwen2.5-VL-Instruct's template (also in tokenizer_config.json);
                               "from-4.52": chat_template.jinja only, and preprocessor_config
                               with every attribute, as 4.57's processor.save_pretrained writes
  tokenizer.json vocab.json merges.txt tokenizer_config.json   Qwen2 byte-level BPE with the
                               14 Qwen2.5-VL special tokens right after the normal vocabulary
  model-0000i-of-0000n.safetensors + model.safetensors.index.json   bf16; names "visual.*",
                               "model.*", "lm_head.*" before 4.52, "model.visual.*",
                               "model.language_model.*", "lm_head.*" from 4.52

Sizes: the text head is 128 wide (hidden 256 / 2 heads) so that the real mrope_section
[16, 24, 24] (64 rotary pairs) applies unchanged; every size is a parameter (bench profiles
build the real vision tower beside a Qwen2-0.5B text model, head 64, mrope_section [8, 12, 12]
and 151936 embedding rows); the defaults write the tiny folder byte for byte as before. The
vision tower keeps 14-px patches,
temporal patch 2, 2x2 merge, 112-px windows and full attention in fullatt_block_indexes.
Weights are drawn from one seeded generator in state-dict order, so both layouts hold
bit-identical tensors. Their scale (STD) is larger than an init's so that greedy answers
depend on the image and the question.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from huatuo_lite.errors import HuatuoError
from huatuo_lite.families import qwen25vl as fam
from huatuo_lite.fsutil import atomic_path

from ..tiny.shards import embedding_rows, write_json, write_shards
from .checkpoint import expected_tensors, text_facts, vision_facts
from ..tiny.tokenizer import build_qwen2_tokenizer

# Qwen2.5-VL's added special tokens after Qwen2's three (ids 151646..151656 upstream).
EXTRA_SPECIALS = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                  "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# Qwen2.5-VL-7B-Instruct's chat_template.json (= its tokenizer_config.json "chat_template"):
# the default system prompt when the first message is not a system one, images/videos as
# "<|vision_start|><|image_pad|><|vision_end|>", optional "Picture n: " with add_vision_id.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REAL_MAX_PIXELS = 12845056       # Qwen2.5-VL-7B-Instruct's preprocessor_config.json
STD = 0.08                       # matrices / embeddings / biases; norms 1 + N(0, STD)
LAYOUTS = tuple(fam.LAYOUT_PREFIXES)


@dataclass(frozen=True)
class QwenTinySizes:
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 2
    num_heads: int = 2                # head_dim 128: mrope_section [16, 24, 24] sums to 64
    num_kv_heads: int = 1
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 160
    vision_depth: int = 4
    vision_heads: int = 2             # vision head_dim 32 (2-D rotary needs a multiple of 4)
    fullatt_block_indexes: tuple = (1, 3)
    window_size: int = 112
    num_shards: int = 3
    mrope_section: tuple = (16, 24, 24)   # (time, row, col) rotary pairs: sum = head_dim / 2
    vocab_rows: int = 0               # embedding/lm_head rows; 0: the tokenizer size rounded up (embedding_rows)


SIZE_RULES = (
    (lambda s: s.hidden_size % s.num_heads == 0 and 2 * sum(s.mrope_section) == s.hidden_size // s.num_heads,
     "hidden_size / num_heads must be 128 for mrope_section [16, 24, 24], in general twice the sum of "
     "mrope_section"),
    (lambda s: len(s.mrope_section) == 3 and min(s.mrope_section) > 0,
     "mrope_section must be three positive rotary-pair counts (time, row, col)"),
    (lambda s: s.vocab_rows >= 0, "vocab_rows must be 0 (from the tokenizer) or a positive row count"),
    (lambda s: s.num_heads % s.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"),
    (lambda s: s.vision_hidden_size % (4 * s.vision_heads) == 0,
     "vision_hidden_size / vision_heads must be a multiple of 4 (2-D rotary)"),
    (lambda s: all(0 <= i < s.vision_depth for i in s.fullatt_block_indexes),
     "fullatt_block_indexes must name vision layers"),
    (lambda s: s.window_size % fam.FACTOR == 0, "window_size must be a multiple of 28"),
)


# ------------------------------------------------------------------ config ----
def flat_config(s: QwenTinySizes, rows: int, ids: dict) -> dict:
    """Qwen2.5-VL-7B-Instruct's config.json key set (flat, as released) with tiny values."""
    return {
        "architectures": [fam.VARIANT.architecture],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": s.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate_size,
        "max_position_embeddings": 128000,
        "max_window_layers": s.num_layers,
        "model_type": fam.VARIANT.model_type,
        "num_attention_heads": s.num_heads,
        "num_hidden_layers": s.num_layers,
        "num_key_value_heads": s.num_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": s.vision_depth,
            "hidden_act": "silu",
            "hidden_size": s.vision_hidden_size,
            "intermediate_size": s.vision_intermediate_size,
            "num_heads": s.vision_heads,
            "in_chans": 3,
            "out_hidden_size": s.hidden_size,
            "patch_size": fam.PATCH_SIZE,
            "spatial_merge_size": fam.MERGE_SIZE,
            "spatial_patch_size": fam.PATCH_SIZE,
            "window_size": s.window_size,
            "fullatt_block_indexes": list(s.fullatt_block_indexes),
            "tokens_per_second": 2,
            "temporal_patch_size": fam.TEMPORAL_PATCH_SIZE,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(s.mrope_section)},
        "vocab_size": rows,
    }


def saved_by_457(flat: dict) -> dict:
    """The same config as transformers 4.57 writes it (save_pretrained of the flat one):
    flat keys kept, text keys repeated under text_config, rope_scaling type "default"."""
    from transformers import Qwen2_5_VLConfig

    return json.loads(Qwen2_5_VLConfig(**flat).to_json_string(use_diff=True))


def generation_config(ids: dict, version: str) -> dict:
    """Qwen2.5-VL-7B-Instruct's generation_config.json with this tokenizer's ids."""
    eot, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    return {"bos_token_id": eot, "pad_token_id": eot, "do_sample": True, "eos_token_id": [im_end, eot],
            "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
            "transformers_version": version}


def preprocessor_config(max_pixels: int) -> dict:
    """Qwen2.5-VL-7B-Instruct's preprocessor_config.json (max_pixels may be lowered for tests)."""
    return {"min_pixels": fam.MIN_PIXELS, "max_pixels": int(max_pixels), "patch_size": fam.PATCH_SIZE,
            "temporal_patch_size": fam.TEMPORAL_PATCH_SIZE, "merge_size": fam.MERGE_SIZE,
            "image_mean": list(fam.IMAGE_MEAN), "image_std": list(fam.IMAGE_STD),
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}


def preprocessor_saved_by_457(max_pixels: int) -> dict:
    """The same as transformers 4.57's processor.save_pretrained writes it: every
    attribute, and the pixel bounds twice (min/max_pixels and size)."""
    config = preprocessor_config(max_pixels)
    return {**config, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "resample": 3, "rescale_factor": 1 / 255,
            "size": {"longest_edge": config["max_pixels"], "shortest_edge": config["min_pixels"]}}


def _template_files_before(root: Path, tokenizer_config: dict) -> None:
    """Qwen's release: chat_template.json and the same text in tokenizer_config.json."""
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    write_json(root / "chat_template.json", {"chat_template": CHAT_TEMPLATE})


def _template_files_from(root: Path, tokenizer_config: dict) -> None:
    """transformers >= 4.52's save_pretrained: chat_template.jinja only."""
    tokenizer_config.pop("chat_template", None)
    (root / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


# layout -> (config.json, preprocessor_config.json, chat template files) as that transformers saved them
LAYOUT_FILES = {
    "before-4.52": (lambda flat: flat, preprocessor_config, _template_files_before),
    "from-4.52": (saved_by_457, preprocessor_saved_by_457, _template_files_from),
}


# ----------------------------------------------------------------- weights ----
# Names and shapes come from checkpoint.expected_tensors (the reader checks the same table).
def stored_name(canonical: str, layout: str) -> str:
    """Canonical (pre-4.52) name -> its name in `layout` (families.qwen25vl.LAYOUT_PREFIXES)."""
    for stored, canon in fam.LAYOUT_PREFIXES[layout]:
        if canonical.startswith(canon):
            return stored + canonical[len(canon):]
    raise ValueError(f"{canonical} has no prefix of layout {layout}")


def _iter_weights(spec: list, seed: int, layout: str):
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, shape, kind in spec:
        noise = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(STD)
        yield stored_name(name, layout), (noise.add_(1.0) if kind == "norm" else noise).to(torch.bfloat16)


# ----------------------------------------------------------------- folder ----
def _tokenizer(root: Path, layout: str) -> dict:
    """Qwen2 BPE + the Qwen2.5-VL specials; tokenizer_config as Qwen2.5-VL-7B-Instruct's
    (eos <|im_end|>, pad <|endoftext|>), the chat template where `layout`'s writer put it."""
    tok = build_qwen2_tokenizer(root, extra_tokens=EXTRA_SPECIALS)
    path = root / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=131072,
                  additional_special_tokens=[t for t in tok.special_ids if t != "<|endoftext|>"])
    LAYOUT_FILES[layout][2](root, config)
    write_json(path, config)
    special_map = root / "special_tokens_map.json"
    write_json(special_map, {**json.loads(special_map.read_text(encoding="utf-8")), "eos_token": "<|im_end|>"})
    return {"size": tok.size, **tok.special_ids}


def _build(root: Path, s: QwenTinySizes, layout: str, seed: int, max_pixels: int) -> None:
    ids = _tokenizer(root, layout)
    size = ids.pop("size")
    if s.vocab_rows and s.vocab_rows < size:
        raise HuatuoError(f"vocab_rows {s.vocab_rows} is below the tokenizer's {size} tokens: "
                          "choose at least that many rows.")
    rows = s.vocab_rows or embedding_rows(size)
    config_writer, preprocessor_writer, _ = LAYOUT_FILES[layout]
    flat = flat_config(s, rows, ids)
    config = config_writer(flat)
    write_json(root / "config.json", config)
    write_json(root / "generation_config.json", generation_config(ids, config["transformers_version"]))
    write_json(root / "preprocessor_config.json", preprocessor_writer(max_pixels))
    spec = expected_tensors(text_facts(flat, "tiny"), vision_facts(flat, "tiny"))   # the reader's own table
    nbytes = {stored_name(name, layout): 2 * _numel(shape) for name, shape, _ in spec}
    write_shards(root, _iter_weights(spec, seed, layout), nbytes, s.num_shards)


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_tiny_qwen25vl(root, layout: str = "before-4.52", seed: int = 0, max_pixels: int = REAL_MAX_PIXELS,
                       **sizes) -> Path:
    """Write the tiny checkpoint into `root` (absent or empty) and return its path.
    sizes override QwenTinySizes fields."""
    if layout not in LAYOUTS:
        raise HuatuoError(f"Unknown Qwen2.5-VL tensor layout {layout!r}: choose one of {', '.join(LAYOUTS)}.")
    unknown = set(sizes) - set(asdict(QwenTinySizes()))
    if unknown:
        raise HuatuoError(f"Unknown tiny size {sorted(unknown)[0]!r}: known sizes are "
                          f"{', '.join(asdict(QwenTinySizes()))}.")
    chosen = replace(QwenTinySizes(), **{key: tuple(value) if isinstance(value, list) else value
                                         for key, value in sizes.items()})   # JSON gives lists
    broken = next((why for rule, why in SIZE_RULES if not rule(chosen)), None)
    if broken:
        raise HuatuoError(f"Bad tiny sizes: {broken}.")
    out = Path(root)
    if out.exists() and any(out.iterdir()):
        raise HuatuoError(f"{out} already exists and is not empty: choose a new folder.")
    with atomic_path(out) as work:        # never a half-written folder
        work.mkdir()
        _build(work, chosen, layout, seed, max_pixels)
    return out


def build_tiny_variant(root: Path, sizes, seed: int) -> None:
    """convert/tiny/make.py VARIANT_BUILDERS entry ("7b-qwen25vl"): the before-4.52 layout
    (the LLaVA TinySizes do not apply to this family: its own defaults are used)."""
    _build(Path(root), QwenTinySizes(), "before-4.52", seed, REAL_MAX_PIXELS)


__all__ = ["make_tiny_qwen25vl", "QwenTinySizes", "CHAT_TEMPLATE", "EXTRA_SPECIALS", "LAYOUTS", "stored_name"]
