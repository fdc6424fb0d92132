"""The llama.cpp backend: a converted GGUF folder run by llama-cpp-python.

Text runs in llama.cpp through the low-level batch API (our own batches, one KV
cache). LLaVA family: image features come from vision.onnx on onnxruntime and are
fed to llama.cpp as embeddings, because libmtmd's LLaVA graph is wrong in the
vendored llama.cpp (see gguf_mtmd.py); libmtmd is used only when the folder's
manifest records a passed self-test. Qwen2.5-VL family: libmtmd computes the
features (its self-test against transformers passed at conversion) and the prompt
takes 3-D M-RoPE positions (4 per embedding row, as libmtmd's own helper feeds them).
Images always arrive preprocessed by image/load.py.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import HuatuoError, ModelFormatError, PromptError
from ..families import family_module
from ..manifest import check_sizes, files_with_role, read_manifest
from .base import (ImageEmbeds, Segment, common_prefix, drop_positions, mrope_positions, position_keys,
                   segments_length)
from .state import file_identity, segment_boundary
from .gguf_files import check_mmproj, physical_cores, pick_text
from .vision_onnx import LazyVision
from .gguf_llama import Batch, load_model, new_context, quiet_llama

N_BATCH = 512
# unquantized weights get F32 attention: with llama.cpp's F16 KV cache + flash attention
# an F16 model's logits were 1.2e-3 off the reference (2.5x more) and greedy flipped at near-ties
EXACT_QUANTS = {"F32", "F16", "BF16"}


def open_engine(model_dir, *, quant: str | None = None, threads: int | None = None, n_ctx: int | None = None,
                gpu_layers: int = 0, **ignored) -> "GgufEngine":
    return GgufEngine(Path(model_dir), quant=quant, threads=threads or physical_cores(),
                      n_ctx=n_ctx, gpu_layers=gpu_layers)


class GgufEngine:
    """One llama.cpp model + context and one image encoder (see base.Engine)."""

    name = "gguf"

    def __init__(self, folder: Path, *, quant=None, threads: int = 1, n_ctx: int | None = None, gpu_layers: int = 0):
        import llama_cpp

        self._llama = llama_cpp
        manifest = read_manifest(folder)
        if manifest.get("format") != "gguf":
            raise ModelFormatError(f"{folder} holds a {manifest.get('format')} model, not GGUF; "
                                   "use --backend onnx or convert with `huatuo-lite convert gguf`.")
        text = manifest["text"]
        self.family = manifest.get("family", "llava")
        facts = family_module(self.family)
        # qwen25vl: 3-D (M-RoPE) positions; its checkpoint's own sampling defaults and image bounds
        self._mrope = self.family == "qwen25vl"
        self.generation_defaults = _generation_defaults(facts, manifest.get("generation"))
        image = manifest.get("image") or {}
        self.image_pixels = (image["min_pixels"], image["max_pixels"]) if "max_pixels" in image else None
        self.hidden_size = int(text["n_embd"])
        self.text_path = pick_text(folder, manifest, quant)
        # the width check first: a swapped-in mmproj gets the sentence naming it, not "replaced"
        self.mmproj_path = check_mmproj(folder, manifest, self.hidden_size)
        check_sizes(folder, manifest)
        limit = facts.CONTEXT_LENGTH
        self.n_ctx = int(n_ctx or min(text.get("n_ctx") or limit, limit))
        self.eos_token_ids = frozenset(int(i) for i in text.get("eos_token_ids", []))
        self.threads = threads
        self._model = self._ctx = self._images = None
        self._batches = []
        quiet_llama()
        self._model = load_model(self.text_path, gpu_layers)
        self._check_text_width()
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        exact = str(manifest["files"][self.text_path.name].get("quant")).upper() in EXACT_QUANTS
        self._ctx = new_context(self._model, self.n_ctx, threads, N_BATCH, exact=exact)
        self._identity_parts = (folder, manifest, exact, gpu_layers)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._tokens = Batch(N_BATCH)
        self._embeds = Batch(N_BATCH, self.hidden_size, n_pos_per_embd=4 if self._mrope else 1)
        self._batches = [self._tokens, self._embeds]
        self._images = self._image_encoder(folder, manifest, gpu_layers)
        self._pos = 0                  # rows in the KV cache
        self._next_pos = 0             # the position the next token takes (== _pos unless M-RoPE)
        self._cached_keys: list = []   # position keys of what the KV cache holds
        self.reused_positions = 0      # how many prompt positions the last prefill reused

    def _check_text_width(self) -> None:
        width = self._llama.llama_model_n_embd(self._model)
        if width != self.hidden_size:
            raise ModelFormatError(f"{self.text_path.name} has width {width} but the manifest says "
                                   f"{self.hidden_size}: the folder mixes files of two models; convert again.")

    def _image_encoder(self, folder: Path, manifest: dict, gpu_layers: int):
        return {"llava": self._llava_images, "qwen25vl": self._mtmd_images}[self.family](folder, manifest, gpu_layers)

    def _mtmd_images(self, folder: Path, manifest: dict, gpu_layers: int):
        """libmtmd, trusted only on the self-test the conversion ran against the torch reference
        with this very llama-cpp-python (the runtime has no reference to test against)."""
        import llama_cpp

        from .gguf_mtmd import MtmdEncoder

        self._vision_path = None
        verdict = manifest.get("mtmd_self_test") or {}
        if self.mmproj_path is None:
            return None
        if not verdict.get("passed") or verdict.get("llama_cpp_python") != llama_cpp.__version__:
            raise ModelFormatError(
                f"{folder} was not proven to read images with this llama.cpp (llama-cpp-python "
                f"{llama_cpp.__version__}; the conversion's self-test: {verdict or 'none'}): convert the model "
                "again with `huatuo-lite convert gguf` to re-run the self-test.")
        from ..families import qwen25vl

        # libmtmd resizes to its own token bounds (8..4096 for Qwen2.5-VL) unless told ours: an image
        # we sized within the model's min/max pixels must reach it unchanged
        low, high = self.image_pixels or (qwen25vl.MIN_PIXELS, qwen25vl.MAX_PIXELS)
        area = qwen25vl.FACTOR ** 2
        bounds = (max(1, -(-low // area)), high // area)
        return MtmdEncoder(self.mmproj_path, self._model, self.hidden_size, self.threads, gpu_layers != 0,
                           token_bounds=bounds)

    def _llava_images(self, folder: Path, manifest: dict, gpu_layers: int):
        """libmtmd when its self-test passed with this llama.cpp, else vision.onnx (None: text only)."""
        from .gguf_mtmd import MtmdEncoder, mtmd_trusted

        vision = (files_with_role(folder, manifest, "vision") or [None])[0]
        self._vision_path = vision
        if mtmd_trusted(manifest.get("mtmd_self_test"), self.text_path, self.mmproj_path, vision,
                        self.threads, model=self._model):
            return MtmdEncoder(self.mmproj_path, self._model, self.hidden_size, self.threads, gpu_layers != 0)
        return LazyVision(vision, self.hidden_size, self.threads) if vision else None

    # --------------------------------------------------------------- text ----
    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            buf = (self._llama.llama_token * size)()
            # parse_special=True: like HF, added special tokens written in the text are matched
            n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, size, False, True)
            if n >= 0:
                return list(buf[:n])
            size = -n
        raise HuatuoError("llama.cpp could not tokenize the text.")

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of a token; control tokens (<|endoftext|>...) give b"" as in the reference."""
        buf = ctypes.create_string_buffer(64)
        n = self._llama.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._llama.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, False)
        return bytes(buf.raw[:n])

    # -------------------------------------------------------------- images ----
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        if self._images is None:   # a text-only conversion (vision_onnx=False)
            raise ModelFormatError(f"{self.text_path.parent} has no vision.onnx, so it cannot read images "
                                   "(this llama.cpp's own image path fails its self-test); convert the model "
                                   "again with `huatuo-lite convert gguf`.")
        features = self._images.encode(pixel_values)
        if self._mrope:   # libmtmd must have kept our size: the positions follow (h/28)*(w/28)
            from ..families.qwen25vl import image_tokens

            for pixels, rows in zip(pixel_values, features):
                if len(rows) != image_tokens(np.asarray(pixels)):
                    raise ModelFormatError(
                        f"llama.cpp's image path gave {len(rows)} features for a {pixels.shape[2]}x"
                        f"{pixels.shape[1]} image where the model takes {image_tokens(np.asarray(pixels))}: "
                        "this llama.cpp resizes differently; convert the model again to re-run the self-test.")
        return features

    # ------------------------------------------------------------ decoding ----
    def prefill(self, segments: Sequence[Segment], all_logits: bool = False) -> np.ndarray:
        total = segments_length(segments)
        if total == 0:
            raise PromptError("The prompt is empty: give at least one token.")
        if total > self.n_ctx:
            raise PromptError(f"The prompt needs {total} tokens but the context holds {self.n_ctx}; "
                              "ask a shorter question, use fewer images or a larger --n-ctx.")
        keys = position_keys(segments)
        # Prefix reuse: a follow-up on the same image(s) keeps their KV rows (all_logits
        # needs every position's logits, so it always starts over).
        # Only whole segments are kept: each segment is fed as its own batches, so the kept
        # rows and the rest are the numbers of a cold prefill (same batches, same KV).
        keep = 0 if all_logits else segment_boundary(segments, common_prefix(self._cached_keys, keys))
        positions, next_pos = mrope_positions(segments) if self._mrope else (None, total)
        # M-RoPE: a KV row's position is its time position, which images do not advance per row
        cut = keep if positions is None else int(positions[0][keep])
        if keep == 0 or not self._llama.llama_memory_seq_rm(self._memory, 0, cut, -1):
            self._llama.llama_memory_clear(self._memory, True)
            keep = 0
        self._pos, self._cached_keys, self.reused_positions = keep, keys[:keep], keep
        rows = []
        for seg in drop_positions(segments, keep):
            rows.extend(self._feed(seg, all_logits, last=self._pos + _seg_len(seg) == total, positions=positions))
        self._cached_keys, self._next_pos = keys, next_pos   # only once every position is in the cache
        return np.stack(rows) if all_logits else rows[-1]

    def step(self, token_id: int) -> np.ndarray:
        if self._pos >= self.n_ctx:
            raise PromptError(f"The answer reached the context length ({self.n_ctx} tokens); use a larger --n-ctx.")
        here = np.full((3, self._pos + 1), self._next_pos, np.int64) if self._mrope else None
        logits = self._feed([token_id], False, last=True, positions=here)[-1]
        self._cached_keys.append(int(token_id))
        self._next_pos += 1
        return logits

    def _feed(self, seg: Segment, all_logits: bool, last: bool, positions: np.ndarray | None = None) -> list:
        """Decode one segment from row self._pos; `positions` int [3, L] of the whole prompt (M-RoPE)."""
        is_image = isinstance(seg, ImageEmbeds)
        values = seg.features if is_image else seg
        batch = self._embeds if is_image else self._tokens
        rows, n = [], len(values)
        for start in range(0, n, N_BATCH):
            chunk = values[start:start + N_BATCH]
            want = np.zeros(len(chunk), bool)
            want[:] = all_logits
            want[-1] |= last and start + len(chunk) == n
            here = None if positions is None else positions[:, self._pos:self._pos + len(chunk)]
            batch.fill(self._pos, len(chunk), want, positions=here,
                       **({"embd": chunk} if is_image else {"tokens": chunk}))
            rc = self._llama.llama_decode(self._ctx, batch.batch)
            if rc != 0:
                raise HuatuoError(f"llama.cpp failed to decode (error {rc}); the context may be full.")
            rows.extend(self._logits(i) for i in np.flatnonzero(want))
            self._pos += len(chunk)
        return rows

    # --------------------------------------------- persistent prefix (cache.py) ----
    def cache_identity(self) -> dict:
        """What determines the image features and the KV state of a prefix: the files'
        digests, the quant, and the context settings that change numbers (not threads)."""
        folder, manifest, exact, gpu_layers = self._identity_parts
        encoder = {LazyVision: "vision.onnx"}.get(type(self._images), type(self._images).__name__)
        vision = [file_identity(folder, manifest, p.name) for p in (self.mmproj_path, self._vision_path) if p]
        features = {"backend": "gguf", "encoder": encoder, "vision": vision, "gpu_layers": gpu_layers,
                    "runtime": _versions()}
        text = file_identity(folder, manifest, self.text_path.name)
        prefix = {**features, "text": text, "n_ctx": self.n_ctx, "n_batch": N_BATCH,
                  "kv": "f32" if exact else "default", "flash_attn": "off" if exact else "default"}
        return {"features": features, "prefix": prefix}

    def held_positions(self, segments: Sequence[Segment]) -> int:
        """How many leading positions of `segments` the KV cache holds already."""
        keys = position_keys(segments)
        n = 0
        for have, want in zip(self._cached_keys, keys):
            if have != want:
                break
            n += 1
        return n

    def export_prefix(self, segments: Sequence[Segment]) -> bytes | None:
        """llama.cpp's state of sequence 0, which must hold exactly `segments`."""
        if self._cached_keys != position_keys(segments):
            return None
        size = self._llama.llama_state_seq_get_size(self._ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = self._llama.llama_state_seq_get_data(self._ctx, buf, size, 0)
        return bytes(buf[:written]) if written else None

    def import_prefix(self, payload: bytes, segments: Sequence[Segment]) -> bool:
        """Load a state written by export_prefix for the same `segments`; False (and an
        empty cache) when llama.cpp refuses it or it does not hold those positions."""
        keys = position_keys(segments)
        self._llama.llama_memory_clear(self._memory, True)
        self._cached_keys, self._pos = [], 0
        buf = (ctypes.c_uint8 * len(payload)).from_buffer_copy(payload)
        read = self._llama.llama_state_seq_set_data(self._ctx, buf, len(payload), 0)
        positions, next_pos = mrope_positions(segments) if self._mrope else (None, len(keys))
        last = len(keys) - 1 if positions is None else int(positions[0].max())
        if (read != len(payload) or self._llama.llama_memory_seq_pos_min(self._memory, 0) != 0
                or self._llama.llama_memory_seq_pos_max(self._memory, 0) != last):
            self._llama.llama_memory_clear(self._memory, True)
            return False
        self._cached_keys, self._pos, self._next_pos = keys, len(keys), next_pos
        return True

    def _logits(self, index: int) -> np.ndarray:
        ptr = self._llama.llama_get_logits_ith(self._ctx, int(index))
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)

    def close(self) -> None:
        for batch in self._batches:
            batch.close()
        self._batches = []
        if self._images is not None:
            self._images.close()
            self._images = None
        if self._ctx:
            self._llama.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._llama.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _generation_defaults(facts, recorded: dict | None):
    """The family's defaults with what the conversion recorded from the checkpoint's
    generation_config.json (unknown keys ignored: a newer converter may record more)."""
    from dataclasses import fields

    known = {f.name for f in fields(facts.GENERATION_DEFAULTS)}
    return facts.GENERATION_DEFAULTS.with_overrides(**{k: v for k, v in (recorded or {}).items() if k in known})


def _versions() -> dict:
    """The kernels' versions: another llama.cpp or onnxruntime may compute other last bits."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("llama_cpp_python", "onnxruntime"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _seg_len(seg: Segment) -> int:
    return len(seg.features) if isinstance(seg, ImageEmbeds) else len(seg)

