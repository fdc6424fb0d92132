"""config.json & co. for the tiny checkpoints, key for key as upstream.

The llava configs carry the 4.40-era keys of the hub's HuatuoGPT-Vision-7B/34B
(top-level rope_theta; mm_* keys; no mm_patch_merge_type, no
mm_use_im_start_end -- upstream's llava_arch reads both with getattr defaults; we
also leave out mm_use_im_patch_token, which LLaVA's trainer sets together with
mm_use_im_start_end); the -hf config is transformers' 2024 LlavaConfig layout.
Only the sizes are tiny. Architecture-level values (rope base, eps, positions,
sliding window) are the upstream ones.
"""
from __future__ import annotations

from huatuo_lite.families.llava import (CONTEXT_LENGTH, IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, RESCALE,
                                VARIANTS, VISION_SELECT_LAYER)
from huatuo_lite.families.text import TEXT_ARCHS

VIT_SUBDIR = "vit/clip_vit_large_patch14_336"
LLAVA_TRANSFORMERS_VERSION = "4.40.0"
HF_TRANSFORMERS_VERSION = "4.44.0"
CLIP_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
             "num_hidden_layers": 1, "vocab_size": 1024, "max_position_embeddings": 77}
CLIP_PROJECTION_DIM = 64    # 768 for CLIP-L; only the unused text/vision projections see it


def _text_sizes(s, rows: int) -> dict:
    return {"hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
            "num_attention_heads": s.num_heads, "num_hidden_layers": s.num_layers,
            "num_key_value_heads": s.num_kv_heads, "vocab_size": rows}


def _upstream_text(arch_name: str, s, rows: int) -> dict:
    """The LLM part of upstream's config (families/text.py TextArch.upstream_config), tiny sizes."""
    arch = TEXT_ARCHS[arch_name]
    layers = {key: s.num_layers for key in arch.upstream_layer_keys}
    return {**arch.upstream_config, **_text_sizes(s, rows), **layers}


def _ids(bos, eos, pad) -> dict:
    ids = {"bos_token_id": bos, "eos_token_id": eos}
    return ids if pad is None else {**ids, "pad_token_id": pad}


def _mm_keys(s) -> dict:
    return {"freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad",
            "mm_hidden_size": s.vision_hidden_size, "mm_projector_lr": None,
            "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_feature": "patch", "mm_vision_select_layer": VISION_SELECT_LAYER,
            "mm_vision_tower": "./" + VIT_SUBDIR, "tokenizer_model_max_length": CONTEXT_LENGTH,
            "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False, "use_mm_proj": True}


def llava_config(variant: str, s, rows: int, bos, eos, pad) -> dict:
    """config.json of HuatuoGPT-Vision-7B ("7b") or -34B ("34b")."""
    v = VARIANTS[variant]
    config = {"architectures": [v.architecture], "model_type": v.model_type,
              **_upstream_text(v.text_arch, s, rows),
              **_ids(bos, eos, pad), **_mm_keys(s),
              "torch_dtype": "bfloat16", "transformers_version": LLAVA_TRANSFORMERS_VERSION}
    return dict(sorted(config.items()))


def _vision_config(s, projection_dim: int) -> dict:
    """CLIPVisionConfig keys (model_type clip_vision_model)."""
    return {"attention_dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": s.vision_hidden_size,
            "image_size": s.image_size, "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": s.vision_intermediate_size, "layer_norm_eps": 1e-05,
            "model_type": "clip_vision_model", "num_attention_heads": s.vision_heads,
            "num_channels": 3, "num_hidden_layers": s.vision_layers, "patch_size": s.patch_size,
            "projection_dim": projection_dim}


def hf_config(s, rows: int, bos, eos, image_token_id: int) -> dict:
    """config.json of HuatuoGPT-Vision-7B-hf (LlavaForConditionalGeneration, 2024 layout)."""
    v = VARIANTS["7b-hf"]
    arch = TEXT_ARCHS[v.text_arch]
    text = {"architectures": [arch.hf_architecture], "model_type": arch.name,
            **_upstream_text(arch.name, s, rows), **_ids(bos, eos, None), "torch_dtype": "bfloat16"}
    return {"architectures": [v.architecture], "ignore_index": -100,
            "image_seq_length": (s.image_size // s.patch_size) ** 2,
            "image_token_index": image_token_id, "model_type": v.model_type,
            "projector_hidden_act": "gelu", "text_config": dict(sorted(text.items())),
            "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": HF_TRANSFORMERS_VERSION,
            "vision_config": _vision_config(s, 768),
            "vision_feature_layer": VISION_SELECT_LAYER,
            "vision_feature_select_strategy": "default"}


def clip_config(s) -> dict:
    """vit/.../config.json: a CLIPModel (text + vision parts) like openai/clip-vit-large-patch14-336."""
    text = {"attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu",
            "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
            "model_type": "clip_text_model", "pad_token_id": 1,
            "projection_dim": CLIP_PROJECTION_DIM, **CLIP_TEXT}
    return {"architectures": ["CLIPModel"], "initializer_factor": 1.0,
            "logit_scale_init_value": 2.6592, "model_type": "clip",
            "projection_dim": CLIP_PROJECTION_DIM, "text_config": dict(sorted(text.items())),
            "torch_dtype": "float32", "transformers_version": "4.21.3",
            "vision_config": _vision_config(s, CLIP_PROJECTION_DIM)}


def preprocessor_config(image_size: int = IMAGE_SIZE) -> dict:
    """CLIPImageProcessor settings of clip-vit-large-patch14-336 (bicubic = resample 3)."""
    return {"crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True,
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": list(IMAGE_MEAN), "image_processor_type": "CLIPImageProcessor",
            "image_std": list(IMAGE_STD), "resample": 3, "rescale_factor": RESCALE,
            "size": {"shortest_edge": image_size}}


def generation_config(config: dict) -> dict:
    """generation_config.json: the token ids of the (text) config."""
    text = config.get("text_config", config)
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    ids = {k: text[k] for k in keys if text.get(k) is not None}
    return {"_from_model_config": True, **ids, "transformers_version": config["transformers_version"]}
