"""The CLIP tower + projector as a standard llama.cpp mmproj (`clip` arch, `mlp` projector).

Written in llama.cpp's standard form so that stock llama.cpp / Ollama can load it.
LLaVA's features are hidden_states[select_layer] (-2: after n-1 of the n blocks),
before any final norm: we store blocks 0..keep-1 only, set block_count = keep and
feature_layer = [keep], and leave out post_layernorm (see gguf-contract.md: the
legacy form silently ran one block too few).
"""
from __future__ import annotations

import re
from pathlib import Path

import gguf
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, GGUFWriter, VISION_PROJECTOR_TYPE
from gguf import VISION_PROJECTOR_TYPE_NAMES

from huatuo_lite.families.llava import IMAGE_MEAN, IMAGE_STD

from ..checkpoint.read import PROJECTOR_PREFIX, VISION_PREFIX
from ..model_meta import add_general
from .stream import Q, PlannedTensor, iter_mapped, weight_qtype, write_streaming_gguf

MMPROJ_ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.MMPROJ]          # "clip"
PROJECTOR_TYPES = {"mlp2x_gelu": VISION_PROJECTOR_TYPE_NAMES[VISION_PROJECTOR_TYPE.MLP]}  # "mlp"
# CLIP activation -> clip.use_gelu (ggml's default is quick_gelu; true means exact GELU)
USE_GELU = {"quick_gelu": False, "gelu": True}
FEATURE_LAYER_KEY = "clip.vision.feature_layer"

# canonical vision name (after VISION_PREFIX) -> GGUF tensor
EMBEDDING_TENSORS = {
    "embeddings.class_embedding": (MODEL_TENSOR.V_ENC_EMBD_CLS, ""),
    "embeddings.patch_embedding.weight": (MODEL_TENSOR.V_ENC_EMBD_PATCH, ".weight"),
    "embeddings.position_embedding.weight": (MODEL_TENSOR.V_ENC_EMBD_POS, ".weight"),
    "pre_layrnorm.weight": (MODEL_TENSOR.V_PRE_NORM, ".weight"),
    "pre_layrnorm.bias": (MODEL_TENSOR.V_PRE_NORM, ".bias"),
}
BLOCK_TENSORS = {
    "self_attn.q_proj": MODEL_TENSOR.V_ENC_ATTN_Q,
    "self_attn.k_proj": MODEL_TENSOR.V_ENC_ATTN_K,
    "self_attn.v_proj": MODEL_TENSOR.V_ENC_ATTN_V,
    "self_attn.out_proj": MODEL_TENSOR.V_ENC_ATTN_O,
    "layer_norm1": MODEL_TENSOR.V_ENC_INPUT_NORM,
    "layer_norm2": MODEL_TENSOR.V_ENC_POST_ATTN_NORM,
    "mlp.fc1": MODEL_TENSOR.V_ENC_FFN_UP,
    "mlp.fc2": MODEL_TENSOR.V_ENC_FFN_DOWN,
}
_BLOCK_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_PROJ_RE = re.compile(r"(\d+)\.(weight|bias)$")
# kept in F32 whatever the file type: llama.cpp adds them to F32 activations
F32_TENSORS = {TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_CLS], TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_POS] + ".weight"}


def kept_blocks(num_layers: int, select_layer: int) -> int:
    """Blocks that feed hidden_states[select_layer] (index 0 = the embeddings)."""
    return num_layers + 1 + select_layer if select_layer < 0 else select_layer


def mmproj_name(canonical: str, keep: int) -> str | None:
    """canonical name -> GGUF name; None for what the mmproj leaves out."""
    if canonical.startswith(PROJECTOR_PREFIX):
        m = _PROJ_RE.match(canonical[len(PROJECTOR_PREFIX):])
        return f"{TENSOR_NAMES[MODEL_TENSOR.V_MMPROJ].format(bid=m.group(1))}.{m.group(2)}" if m else None
    if not canonical.startswith(VISION_PREFIX):
        return None
    rest = canonical[len(VISION_PREFIX):]
    if rest in EMBEDDING_TENSORS:
        kind, suffix = EMBEDDING_TENSORS[rest]
        return TENSOR_NAMES[kind] + suffix
    m = _BLOCK_RE.match(rest)
    if m and int(m.group(1)) < keep and m.group(2) in BLOCK_TENSORS:
        return f"{TENSOR_NAMES[BLOCK_TENSORS[m.group(2)]].format(bid=int(m.group(1)))}.{m.group(3)}"
    return None   # post_layernorm, blocks past the feature layer


def _qtype(name: str, shape: tuple, wanted) -> gguf.GGMLQuantizationType:
    if name in F32_TENSORS:
        return Q.F32
    if len(shape) > 2:   # the patch conv: ggml's im2col path wants F16 at most
        return Q.F16 if wanted != Q.F32 else Q.F32
    return weight_qtype(shape, wanted)


def mmproj_plan(ckpt, qtype, keep: int) -> list[PlannedTensor]:
    plan = []
    for canonical in ckpt.names():
        name = mmproj_name(canonical, keep)
        if name is not None:
            shape = tuple(ckpt.shape(canonical))
            plan.append(PlannedTensor(name, shape, _qtype(name, shape, qtype)))
    return plan


def mmproj_arrays(ckpt, keep: int):
    def convert(canonical, tensor):
        name = mmproj_name(canonical, keep)
        return None if name is None else (name, tensor)

    for prefix in (VISION_PREFIX, PROJECTOR_PREFIX):
        yield from iter_mapped(ckpt.iter_tensors(prefix), convert)


def add_clip_metadata(w: GGUFWriter, ckpt, keep: int, file_type: int, meta) -> None:
    vision, projector = ckpt.vision, ckpt.projector
    w.add_type(gguf.GGUFType.MMPROJ)
    add_general(w, meta)
    w.add_file_type(file_type)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(PROJECTOR_TYPES[projector.kind])
    w.add_vision_image_size(vision.image_size)
    w.add_vision_patch_size(vision.patch_size)
    w.add_vision_embedding_length(vision.hidden_size)
    w.add_vision_feed_forward_length(vision.intermediate_size)
    w.add_vision_projection_dim(projector.out_features)
    w.add_vision_block_count(keep)
    w.add_vision_head_count(vision.num_heads)
    w.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    w.add_vision_image_mean(list(IMAGE_MEAN))
    w.add_vision_image_std(list(IMAGE_STD))
    w.add_vision_use_gelu(USE_GELU[vision.hidden_act])
    w.add_array(FEATURE_LAYER_KEY, [keep])


def write_mmproj(ckpt, path: Path, qtype, file_type: int, meta) -> Path:
    """Write the mmproj in F16 (weights; norms, biases and embeddings F32) or Q8_0."""
    keep = kept_blocks(ckpt.vision.num_layers, ckpt.vision.select_layer)
    return write_streaming_gguf(
        path, MMPROJ_ARCH, lambda w: add_clip_metadata(w, ckpt, keep, file_type, meta),
        mmproj_plan(ckpt, qtype, keep), mmproj_arrays(ckpt, keep), desc=Path(path).name)
