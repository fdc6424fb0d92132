"""Tiny, format-exact upstream HuatuoGPT-Vision checkpoints for tests.

`make_tiny(out_dir, variant)` writes a folder laid out exactly like the hub
repository of that variant (config keys, tensor names, bf16 shards + index,
tokenizer files, the `vit/` CLIP copy), only small and with random weights:

  7b     LlavaQwen2ForCausalLM / llava_qwen2, byte-level BPE tokenizer (Qwen2)
  34b    LlavaLlamaForCausalLM / llava_llama, SentencePiece tokenizer (Yi)
  7b-hf  LlavaForConditionalGeneration / llava, 2024 -hf key names, <image> token

Weights are drawn in canonical order from one seeded generator, so the same seed
and sizes give bit-identical tensors in 7b and 7b-hf. The `vit/` copy holds the
"original CLIP" weights: drawn from another stream, so a reader that takes the
vision tower from there instead of the embedded weights is caught by tests.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from huatuo_lite.errors import HuatuoError
from huatuo_lite.fsutil import atomic_path
from huatuo_lite.families.llava import IMAGE_SIZE, PATCH_SIZE, VARIANTS

from ..checkpoint.read import to_hf_name
from .configs import (VIT_SUBDIR, clip_config, generation_config, hf_config,
                           llava_config, preprocessor_config)
from .weights import canonical_spec, clip_tensors, iter_canonical, spec_nbytes
from .tokenizer import build_qwen2_tokenizer, build_yi_tokenizer
from .shards import embedding_rows, write_json, write_shards
from ..qwen25vl.tiny import build_tiny_variant as build_tiny_qwen25vl

# The -hf conversion adds <image> right after Qwen2's three specials (151646).
HF_IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class TinySizes:
    """Dimensions of a tiny model. Text hidden/intermediate are multiples of 256
    (K-quant blocks); vision intermediate != vision hidden (llama.cpp swaps the
    CLIP ffn tensors when they are equal); image 336 / patch 14 as upstream so
    that an image is 576 tokens."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden_size: int = 256
    vision_intermediate_size: int = 512
    vision_layers: int = 3
    vision_heads: int = 4
    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    num_shards: int = 3
    vocab_rows: int = 0       # embedding/lm_head rows; 0: the variant's own rule from the tokenizer size
                              # (real shapes: 151936 for Qwen2-0.5B, 152064 for the 7B -- decode reads them)


# (condition that must hold, why) -- checked before anything is written.
SIZE_RULES = (
    (lambda s: s.hidden_size % s.num_heads == 0, "hidden_size must be a multiple of num_heads"),
    (lambda s: s.num_heads % s.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"),
    (lambda s: s.vision_hidden_size % s.vision_heads == 0,
     "vision_hidden_size must be a multiple of vision_heads"),
    (lambda s: s.image_size % s.patch_size == 0, "image_size must be a multiple of patch_size"),
    (lambda s: s.vision_intermediate_size != s.vision_hidden_size,
     "vision_intermediate_size must differ from vision_hidden_size (llama.cpp swaps the CLIP ffn otherwise)"),
    (lambda s: s.vision_layers >= 2, "vision_layers must be at least 2 (features come from layer -2)"),
    (lambda s: s.vocab_rows >= 0, "vocab_rows must be 0 (from the tokenizer) or a positive row count"),
)


def _check_sizes(sizes: TinySizes) -> None:
    broken = next((why for rule, why in SIZE_RULES if not rule(sizes)), None)
    if broken:
        raise HuatuoError(f"Bad tiny sizes: {broken}.")


def _rows(sizes: TinySizes, tokenizer_size: int, default: int) -> int:
    """sizes.vocab_rows when set (never fewer rows than the tokenizer has tokens), else default."""
    if sizes.vocab_rows and sizes.vocab_rows < tokenizer_size:
        raise HuatuoError(f"vocab_rows {sizes.vocab_rows} is below the tokenizer's {tokenizer_size} tokens: "
                          "choose at least that many rows.")
    return sizes.vocab_rows or default


# ------------------------------------------------------------- variants ----
def _build_7b(root: Path, sizes: TinySizes, seed: int) -> None:
    tok = build_qwen2_tokenizer(root)
    eos = tok.special_ids["<|endoftext|>"]
    rows = _rows(sizes, tok.size, embedding_rows(tok.size))
    _write_config(root, llava_config("7b", sizes, rows, bos=eos, eos=eos, pad=None))
    _write_canonical(root, sizes, VARIANTS["7b"].text_arch, rows, seed)
    _write_vit(root, sizes, seed)


def _build_34b(root: Path, sizes: TinySizes, seed: int) -> None:
    tok = build_yi_tokenizer(root)
    ids = tok.special_ids
    # Yi: rows == tokenizer size (64000 both upstream).
    rows = _rows(sizes, tok.size, tok.size)
    _write_config(root, llava_config("34b", sizes, rows, bos=ids["<|startoftext|>"],
                                     eos=ids["<|endoftext|>"], pad=ids["<unk>"]))
    _write_canonical(root, sizes, VARIANTS["34b"].text_arch, rows, seed)
    _write_vit(root, sizes, seed)


def _build_7b_hf(root: Path, sizes: TinySizes, seed: int) -> None:
    tok = build_qwen2_tokenizer(root, extra_tokens=(HF_IMAGE_TOKEN,))
    eos = tok.special_ids["<|endoftext|>"]
    # Same rows as the 7b build: the -hf conversion kept the embedding matrix.
    rows = _rows(sizes, tok.size, embedding_rows(tok.size - 1))
    image_id = tok.special_ids[HF_IMAGE_TOKEN]
    if image_id >= rows:   # cannot happen with the defaults; never write a broken folder
        raise HuatuoError(f"The <image> token id {image_id} does not fit {rows} embedding rows.")
    _write_config(root, hf_config(sizes, rows, bos=eos, eos=eos, image_token_id=image_id))
    write_json(root / "preprocessor_config.json", preprocessor_config(sizes.image_size))
    _write_canonical(root, sizes, VARIANTS["7b-hf"].text_arch, rows, seed, rename=to_hf_name)


def _build_7b_qwen25vl(root: Path, sizes: TinySizes, seed: int) -> None:
    build_tiny_qwen25vl(root, sizes, seed)


VARIANT_BUILDERS = {"7b": _build_7b, "34b": _build_34b, "7b-hf": _build_7b_hf, "7b-qwen25vl": _build_7b_qwen25vl}


# ----------------------------------------------------------------- writing ----
def _write_config(root: Path, config: dict) -> None:
    write_json(root / "config.json", config)
    write_json(root / "generation_config.json", generation_config(config))


def _write_canonical(root: Path, sizes: TinySizes, arch: str, rows: int, seed: int, rename=None) -> None:
    """The decoder + vision + projector weights as bf16 shards, drawn shard by shard (a 7B
    shape is 15 GB: only one shard's tensors are ever in memory). rename: canonical ->
    stored name (the -hf layout); order and random stream are the same either way."""
    rename = rename or (lambda name: name)
    nbytes = {rename(name): n for name, n in spec_nbytes(canonical_spec(sizes, arch, rows)).items()}
    tensors = ((rename(name), t) for name, t in iter_canonical(sizes, arch, rows, seed))
    write_shards(root, tensors, nbytes, sizes.num_shards)


def _write_vit(root: Path, sizes: TinySizes, seed: int) -> None:
    """vit/clip_vit_large_patch14_336/: a full CLIPModel copy (vision + tiny text
    tower) with config.json, preprocessor_config.json and model.safetensors."""
    from safetensors.torch import save_file

    vit = root / VIT_SUBDIR
    vit.mkdir(parents=True)
    config = clip_config(sizes)
    write_json(vit / "config.json", config)
    write_json(vit / "preprocessor_config.json", preprocessor_config(sizes.image_size))
    save_file(clip_tensors(sizes, config["text_config"], seed), str(vit / "model.safetensors"),
              metadata={"format": "pt"})


# -------------------------------------------------------------------- API ----
def make_tiny(out_dir, variant: str = "7b", seed: int = 0, **sizes) -> Path:
    """Write a tiny upstream-format checkpoint of `variant` into out_dir (which
    must not exist or be empty) and return its path. `sizes` overrides
    TinySizes fields (hidden_size=512, vision_layers=4, ...)."""
    if variant not in VARIANT_BUILDERS:
        raise HuatuoError(f"Unknown tiny variant {variant!r}: choose one of {', '.join(VARIANT_BUILDERS)}.")
    unknown = set(sizes) - set(asdict(TinySizes()))
    if unknown:
        raise HuatuoError(f"Unknown tiny size {sorted(unknown)[0]!r}: known sizes are "
                          f"{', '.join(asdict(TinySizes()))}.")
    chosen = replace(TinySizes(), **sizes)
    _check_sizes(chosen)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise HuatuoError(f"{out} already exists and is not empty: choose a new folder.")
    # Built next to the target and renamed when complete (never a half-written folder;
    # a killed run's leftovers are removed by the next, a full disk is one sentence).
    with atomic_path(out) as work:
        work.mkdir()
        VARIANT_BUILDERS[variant](work, chosen, seed)
    return out


__all__ = ["make_tiny", "TinySizes", "VARIANT_BUILDERS", "VARIANTS", "embedding_rows"]
