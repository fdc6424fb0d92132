"""The Qwen2.5-VL vision tower + merger as a llama.cpp mmproj (`clip` arch, `qwen2.5vl_merger`),
and the conversion-time self-test of libmtmd's image features against transformers' own tower.

What libmtmd's qwen2vl graph (tools/mtmd/models/qwen2vl.cpp, clip.cpp of llama-cpp-python
0.3.36) needs, and how the checkpoint's tensors become it:
- the patch embedding is a Conv3d [D, 3, 2, 14, 14] over two copies of a still image in time;
  libmtmd runs two Conv2d [D, 3, 14, 14] on the one frame and adds them, so the kernel is cut
  along time into `v.patch_embd.weight` (t=0) and `v.patch_embd.weight.1` (t=1);
- `attn.qkv` [3D, D] (+ bias [3D]) is cut into attn_q / attn_k / attn_v rows;
- RMSNorm everywhere (norm1 -> ln1, norm2 -> ln2, the merger's ln_q -> v.post_ln, which the graph
  applies to every patch before the 2x2 merge); the MLP is gated SiLU (clip.use_silu);
- the merger MLP [4D -> 4D, GELU, 4D -> text width] is mm.0 / mm.2;
- window attention: the graph runs full attention in blocks with (i + 1) % n_wa_pattern == 0,
  so `fullatt_block_indexes` must be p-1, 2p-1, ...; the window is fixed at 112 px in libmtmd.
"""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, GGUFWriter

from huatuo_lite.errors import ModelFormatError
from huatuo_lite.families import qwen25vl as family

from ..gguf.stream import Q, PlannedTensor, weight_qtype, write_streaming_gguf
from ..model_meta import add_general

MMPROJ_ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.MMPROJ]                                   # "clip"
PROJECTOR = gguf.VisionProjectorType.QWEN25VL                                      # "qwen2.5vl_merger"
PREFIX = "visual."
LIBMTMD_WINDOW_PX = 112          # clip.cpp's attn_window_size default; no GGUF key sets it for this projector
# llama.cpp's converter writes 560 when the config has no image_size; libmtmd sizes these images itself
IMAGE_SIZE = 560
VISION_RMS_EPS = 1e-6            # transformers' Qwen2.5-VL vision RMSNorms (fixed, not in the config)
SELF_TEST_MIN_COSINE = 0.999     # per image token, as the LLaVA family's self-test
# 140 x 252 px: a 5 x 9 grid of merged tokens, so windows of 4 x 4 tokens are cut in both
# directions; multiples of 28 with >= 8 tokens, so libmtmd's own smart resize leaves it alone
SELF_TEST_HW = (140, 252)
SELF_TEST_SEED = 0

# block module (after "visual.blocks.N.") -> GGUF tensor
BLOCK_TENSORS = {
    "attn.proj": MODEL_TENSOR.V_ENC_ATTN_O,
    "norm1": MODEL_TENSOR.V_ENC_INPUT_NORM,
    "norm2": MODEL_TENSOR.V_ENC_POST_ATTN_NORM,
    "mlp.gate_proj": MODEL_TENSOR.V_ENC_FFN_GATE,
    "mlp.up_proj": MODEL_TENSOR.V_ENC_FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.V_ENC_FFN_DOWN,
}
# block modules stored fused: cut into equal row ranges, in this order
SPLIT_TENSORS = {"attn.qkv": (MODEL_TENSOR.V_ENC_ATTN_Q, MODEL_TENSOR.V_ENC_ATTN_K, MODEL_TENSOR.V_ENC_ATTN_V)}
# tensors outside the blocks (after "visual.") -> GGUF name
GLOBAL_TENSORS = {
    "merger.ln_q.weight": TENSOR_NAMES[MODEL_TENSOR.V_POST_NORM] + ".weight",
    "merger.mlp.0.weight": TENSOR_NAMES[MODEL_TENSOR.V_MMPROJ].format(bid=0) + ".weight",
    "merger.mlp.0.bias": TENSOR_NAMES[MODEL_TENSOR.V_MMPROJ].format(bid=0) + ".bias",
    "merger.mlp.2.weight": TENSOR_NAMES[MODEL_TENSOR.V_MMPROJ].format(bid=2) + ".weight",
    "merger.mlp.2.bias": TENSOR_NAMES[MODEL_TENSOR.V_MMPROJ].format(bid=2) + ".bias",
}
PATCH_EMBED = "patch_embed.proj.weight"
PATCH_NAMES = (TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".weight",     # time step 0
               TENSOR_NAMES[MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".weight.1")   # time step 1
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")


# ------------------------------------------------------------ the config ----
def check_vision(ckpt):
    """ckpt.vision (checkpoint.QwenVision) when libmtmd runs it as transformers does; one
    sentence per departure (a file libmtmd would silently run differently is never written)."""
    vision = ckpt.vision
    fixed = {"window_size": (vision.window_size, LIBMTMD_WINDOW_PX),
             "hidden_act": ((ckpt.config.get("vision_config") or {}).get("hidden_act", "silu"), "silu")}
    for key, (value, wanted) in fixed.items():
        if value != wanted:
            raise ModelFormatError(f"{ckpt.root}/config.json's vision_config has {key} {value!r}, but llama.cpp's "
                                   f"Qwen2.5-VL image graph only runs {wanted!r}; this checkpoint cannot be converted to GGUF.")
    if vision.intermediate_size == vision.hidden_size:
        # clip.cpp swaps ffn_up/ffn_down when ffn_down's rows equal the width (a fix for old files)
        raise ModelFormatError(f"{ckpt.root}/config.json's vision_config has intermediate_size equal to hidden_size, "
                               "which llama.cpp mistakes for an old file and swaps the MLP; it cannot be converted to GGUF.")
    return vision


def window_pattern(fullatt: list) -> int:
    """n_wa_pattern p for fullatt_block_indexes [p-1, 2p-1, ...] (libmtmd's only rule); 0 when
    every block is full (libmtmd's "no windows": p = 1 would abort it for want of a window mask)."""
    period = fullatt[0] + 1 if fullatt else 0
    if not fullatt or any(b != (i + 1) * period - 1 for i, b in enumerate(fullatt)):
        raise ModelFormatError(f"config.json's fullatt_block_indexes {fullatt} are not evenly spaced (p-1, 2p-1, ...), "
                               "which llama.cpp's Qwen2.5-VL image graph needs; it cannot be converted to GGUF.")
    return 0 if period == 1 else period


# ------------------------------------------------------------ the tensors ----
def _split_rows(part: int, parts: int):
    return lambda t: t.reshape(parts, t.shape[0] // parts, *t.shape[1:])[part]


def _time_step(step: int):
    return lambda t: t[:, :, step]          # [D, 3, 2, 14, 14] -> [D, 3, 14, 14]


def mmproj_parts(canonical: str, shape: tuple) -> list[tuple[str, tuple, object]]:
    """canonical name -> [(GGUF name, shape, tensor -> part)]; [] for what the mmproj leaves out."""
    if not canonical.startswith(PREFIX):
        return []
    rest = canonical[len(PREFIX):]
    if rest in GLOBAL_TENSORS:
        return [(GLOBAL_TENSORS[rest], shape, None)]
    if rest == PATCH_EMBED:
        cut = (shape[0], shape[1], *shape[3:])
        return [(name, cut, _time_step(t)) for t, name in enumerate(PATCH_NAMES)]
    m = _BLOCK_RE.match(rest)
    if not m:
        return []
    bid, module, kind = int(m.group(1)), m.group(2), m.group(3)
    if module in BLOCK_TENSORS:
        return [(f"{TENSOR_NAMES[BLOCK_TENSORS[module]].format(bid=bid)}.{kind}", shape, None)]
    if module in SPLIT_TENSORS:
        targets = SPLIT_TENSORS[module]
        cut = (shape[0] // len(targets), *shape[1:])
        return [(f"{TENSOR_NAMES[t].format(bid=bid)}.{kind}", cut, _split_rows(i, len(targets)))
                for i, t in enumerate(targets)]
    return []


def _qtype(shape: tuple, wanted):
    if len(shape) > 2:   # the patch convolutions: ggml's im2col path takes F16 at most
        return Q.F32 if wanted == Q.F32 else Q.F16
    return weight_qtype(shape, wanted)


def mmproj_plan(ckpt, qtype) -> list[PlannedTensor]:
    return [PlannedTensor(name, shape, _qtype(shape, qtype))
            for canonical in ckpt.names() for name, shape, _ in mmproj_parts(canonical, tuple(ckpt.shape(canonical)))]


def mmproj_arrays(ckpt):
    """(GGUF name, torch tensor) streamed from the checkpoint's visual.* tensors."""
    for canonical, tensor in ckpt.iter_tensors(PREFIX):
        for name, _, part in mmproj_parts(canonical, tuple(tensor.shape)):
            yield name, (tensor if part is None else part(tensor).contiguous())


def add_metadata(w: GGUFWriter, ckpt, image: dict, file_type: int, meta) -> None:
    vision = check_vision(ckpt)
    w.add_type(gguf.GGUFType.MMPROJ)
    add_general(w, meta)
    w.add_file_type(file_type)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(PROJECTOR)
    w.add_vision_image_size(IMAGE_SIZE)
    w.add_vision_patch_size(family.PATCH_SIZE)
    w.add_vision_embedding_length(vision.hidden_size)
    w.add_vision_feed_forward_length(vision.intermediate_size)
    w.add_vision_projection_dim(vision.out_hidden_size)
    w.add_vision_block_count(vision.depth)
    w.add_vision_head_count(vision.num_heads)
    w.add_vision_attention_layernorm_eps(VISION_RMS_EPS)
    w.add_vision_image_mean(list(image["image_mean"]))
    w.add_vision_image_std(list(image["image_std"]))
    w.add_vision_use_silu(True)
    w.add_vision_spatial_merge_size(family.MERGE_SIZE)
    w.add_vision_n_wa_pattern(window_pattern(list(vision.fullatt_block_indexes)))


def write_mmproj(ckpt, path: Path, qtype, file_type: int, image: dict, meta) -> Path:
    """The mmproj in F32, F16 (matrices; norms and biases F32) or Q8_0. `image`: the
    preprocessor's image_mean / image_std."""
    return write_streaming_gguf(path, MMPROJ_ARCH, lambda w: add_metadata(w, ckpt, image, file_type, meta),
                                mmproj_plan(ckpt, qtype), mmproj_arrays(ckpt), desc=Path(path).name)


# ------------------------------------------------------------- self-test ----
def self_test_pixels(seed: int = SELF_TEST_SEED) -> np.ndarray:
    """A fixed noise image of SELF_TEST_HW, normalized as the runtime does: float32 [3, h, w]."""
    rgb = np.random.default_rng(seed).integers(0, 256, (*SELF_TEST_HW, 3), dtype=np.uint8)
    mean = np.asarray(family.IMAGE_MEAN, np.float32).reshape(3, 1, 1)
    std = np.asarray(family.IMAGE_STD, np.float32).reshape(3, 1, 1)
    return ((rgb.transpose(2, 0, 1).astype(np.float32) * np.float32(family.RESCALE) - mean) / std).astype(np.float32)


def torch_features(ckpt, pixels: np.ndarray) -> np.ndarray:
    """transformers' own vision tower + merger (float32, only the visual.* weights loaded:
    ~2.7 GB for the 7B) on one image [3, h, w] -> [(h/28)*(w/28), text width]."""
    import torch
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = Qwen2_5_VLVisionConfig(**{k: v for k, v in ckpt.config["vision_config"].items() if k != "model_type"})
    config._attn_implementation = "eager"
    tower = Qwen2_5_VisionTransformerPretrainedModel(config).float().eval()
    state = {name[len(PREFIX):]: tensor.float() for name, tensor in ckpt.iter_tensors(PREFIX)}
    tower.load_state_dict(state, strict=True)
    patches, grid = family.patchify(pixels)
    with torch.no_grad():
        out = tower(torch.from_numpy(patches), grid_thw=torch.tensor([grid]))
    return out.numpy().astype(np.float32)


def mtmd_features(text_gguf: Path, mmproj: Path, pixels: np.ndarray, n_embd: int, threads: int) -> np.ndarray:
    """libmtmd's features for one image [3, h, w], handed over as the exact uint8 RGB it came from."""
    import llama_cpp

    from huatuo_lite.backends.gguf_llama import load_model, quiet_llama
    from huatuo_lite.backends.gguf_mtmd import MtmdEncoder

    quiet_llama()
    model = load_model(Path(text_gguf), gpu_layers=0, vocab_only=True)   # libmtmd reads no text weights
    try:
        encoder = MtmdEncoder(Path(mmproj), model, n_embd, threads)
        try:
            return encoder.encode(pixels[None])[0]
        finally:
            encoder.close()
    finally:
        llama_cpp.llama_model_free(model)


def mtmd_self_test(ckpt, text_gguf: Path, mmproj: Path, threads: int = 1) -> dict:
    """Per-token cosines of libmtmd's features vs transformers' on a fixed image:
    {"passed", "min_cosine", "mean_cosine", "llama_cpp_python", "image_hw", "tokens"}."""
    import llama_cpp

    from huatuo_lite.backends.gguf_mtmd import token_cosines

    pixels = self_test_pixels()
    reference = torch_features(ckpt, pixels)
    features = mtmd_features(text_gguf, mmproj, pixels, reference.shape[-1], threads)
    verdict = {"llama_cpp_python": llama_cpp.__version__, "image_hw": list(SELF_TEST_HW)}
    if features.shape != reference.shape:
        return {**verdict, "passed": False,
                "error": f"libmtmd gave {list(features.shape)}, expected {list(reference.shape)}"}
    cos = token_cosines(features, reference)
    return {**verdict, "passed": bool(cos.min() >= SELF_TEST_MIN_COSINE), "tokens": int(len(cos)),
            "min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6)}
