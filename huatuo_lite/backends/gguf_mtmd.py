"""Image features through llama.cpp's libmtmd, and the self-test that decides whether to use it.

In llama-cpp-python 0.3.36's llama.cpp the LLaVA image graph puts the class
embedding after the patches, so every patch gets its neighbour's position and the
CLS output reaches the projector (see the GGUF issue). Until that is fixed the
GGUF backend computes image features with vision.onnx; `mtmd_self_test` compares
the two at conversion time and records the verdict in the manifest, so a fixed
llama.cpp is picked up by itself.

libmtmd is only ever given pixels that image/load.py already padded and resized
(336x336, turned back into the exact uint8 RGB they came from), so its own
resize/pad never runs.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ..families import common as family
from ..errors import ModelFormatError

SELF_TEST_MIN_COSINE = 0.999   # per image token; a fixed llama.cpp measures ~1 - 1e-6
SELF_TEST_SEED = 0


def pixels_to_rgb8(pixel_values: np.ndarray) -> np.ndarray:
    """Undo image/load.py's normalization: [N,3,S,S] float32 -> [N,S,S,3] uint8 (exact: the
    values came from uint8 through x/255, -mean, /std)."""
    mean = np.asarray(family.CLIP_MEAN, np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(family.CLIP_STD, np.float64).reshape(1, 3, 1, 1)
    values = (pixel_values.astype(np.float64) * std + mean) / family.RESCALE
    return np.clip(np.rint(values), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()


class MtmdEncoder:
    """libmtmd's CLIP + projector on one mmproj: encode(pixels [N,3,S,S]) -> [N,T,H]."""

    def __init__(self, mmproj: Path, model, n_embd: int, threads: int, use_gpu: bool = False,
                 token_bounds: tuple[int, int] | None = None):
        from llama_cpp import mtmd_cpp

        self._mtmd = mtmd_cpp
        self.n_embd = n_embd   # H: the text model's width (libmtmd's output rows)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False
        if token_bounds:   # (min, max) image tokens: ours, so libmtmd's own resize keeps our size
            params.image_min_tokens, params.image_max_tokens = token_bounds
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), model, params)
        if not self.ctx:
            raise ModelFormatError(f"llama.cpp could not load the mmproj {mmproj}; convert the model again.")

    def encode(self, pixel_values):
        """[N,3,S,S] (or a list of [3,h,w] of several sizes) -> [N,T,H] (or a list of [T_i,H])."""
        out = [self._encode_one(pixels_to_rgb8(np.asarray(p)[None])[0]) for p in pixel_values]
        return np.stack(out) if len({o.shape for o in out}) == 1 else out

    def _encode_one(self, rgb: np.ndarray) -> np.ndarray:
        m = self._mtmd
        height, width, _ = rgb.shape
        data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = m.mtmd_bitmap_init(width, height, data)
        chunks = m.mtmd_input_chunks_init()
        try:
            marker = m.mtmd_default_marker()
            text = m.mtmd_input_text(marker, len(marker), False, False)
            bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise RuntimeError("mtmd_tokenize failed")
            return self._encode_image_chunk(chunks)
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    def _encode_image_chunk(self, chunks) -> np.ndarray:
        m = self._mtmd
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                continue
            if m.mtmd_encode_chunk(self.ctx, chunk) != 0:
                raise RuntimeError("mtmd_encode_chunk failed")
            n_tokens = m.mtmd_input_chunk_get_n_tokens(chunk)
            embd = m.mtmd_get_output_embd(self.ctx)
            flat = np.ctypeslib.as_array(embd, shape=(n_tokens * self.n_embd,))
            return flat.reshape(n_tokens, self.n_embd).copy()
        raise RuntimeError("libmtmd produced no image chunk")

    def close(self) -> None:
        if self.ctx:
            self._mtmd.mtmd_free(self.ctx)
            self.ctx = None


def token_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token cosine similarity of two [.., T, H] arrays."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def self_test_pixels(image_size: int, seed: int = SELF_TEST_SEED) -> np.ndarray:
    """A fixed random RGB image, already square at image_size, through image/load.py."""
    from PIL import Image

    from ..image.load import preprocess

    rgb = np.random.default_rng(seed).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    return preprocess([Image.fromarray(rgb, "RGB")])


def mtmd_self_test(text_gguf, mmproj, vision_onnx, threads: int = 1, model=None) -> dict:
    """Compare libmtmd's image features with vision.onnx's on a fixed image (`model`: an
    already loaded text model, else text_gguf's vocabulary and hyper-parameters are
    loaded -- libmtmd reads no text weights, and mapping a 7B's 4.5 GB of them set the
    conversion's peak memory).
    Returns {"passed", "min_cosine", "mean_cosine", "llama_cpp_python"}."""
    import llama_cpp

    from .gguf_llama import load_model, quiet_llama
    from .vision_onnx import OnnxVisionEncoder

    quiet_llama()
    reference_encoder = OnnxVisionEncoder(vision_onnx, threads=threads)
    pixels = self_test_pixels(reference_encoder.image_size)
    reference = reference_encoder.encode(pixels)
    reference_encoder.close()
    own_model = model is None
    model = load_model(Path(text_gguf), gpu_layers=0, vocab_only=True) if own_model else model
    try:
        encoder = MtmdEncoder(Path(mmproj), model, reference.shape[-1], threads)
        try:
            features = encoder.encode(pixels)
        finally:
            encoder.close()
    finally:
        if own_model:
            llama_cpp.llama_model_free(model)
    verdict = {"llama_cpp_python": llama_cpp.__version__}
    if features.shape != reference.shape:
        return {**verdict, "passed": False,
                "error": f"libmtmd gave {list(features.shape)}, expected {list(reference.shape)}"}
    cos = token_cosines(features, reference)
    return {**verdict, "passed": bool(cos.min() >= SELF_TEST_MIN_COSINE), "min_cosine": round(float(cos.min()), 6),
            "mean_cosine": round(float(cos.mean()), 6)}


def mtmd_trusted(recorded: dict | None, text_gguf, mmproj, vision_onnx, threads: int, model=None) -> bool:
    """Whether to take image features from libmtmd: the manifest's verdict when it was made
    with the llama-cpp-python installed now, else a fresh self-test (needs vision.onnx)."""
    import llama_cpp

    if mmproj is None:
        return False
    if recorded and recorded.get("llama_cpp_python") == llama_cpp.__version__:
        return bool(recorded.get("passed"))
    if vision_onnx is None:
        return False
    return mtmd_self_test(text_gguf, mmproj, vision_onnx, threads, model=model)["passed"]
