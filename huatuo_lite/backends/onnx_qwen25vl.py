"""The onnxruntime engine for a Qwen2.5-VL folder (manifest "family": "qwen25vl"),
written by convert/qwen25vl/onnx_export.py. No torch, no transformers.

What differs from the LLaVA family's OnnxEngine (onnx.py, whose tokenizer, KV cache
handling, prefix reuse and cache export this engine inherits):
- images keep their size: encode_images takes a list of [3, h, w] (h, w multiples of
  28) and returns one [h/28 * w/28, H] array per image; per image it patchifies
  (families.qwen25vl.patchify) and feeds vision.onnx the numpy tables of
  qwen25vl_tables (window order, 2-D rotary, masks), one image per call so the
  [P, P] masks stay one image's size.
- positions are 3-D (M-RoPE): prefill computes them for the whole prompt with
  families.qwen25vl.positions (images need their ImageEmbeds.grid) and feeds the
  decoder the rotary cos/sin of each chunk; step() continues at the next position.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ModelFormatError, PromptError
from ..families import qwen25vl as fam
from ..manifest import check_sizes, read_manifest
from .base import Segment, mrope_positions
from .onnx import DECODER_INPUTS, TOKENIZER_FILE, OnnxEngine, TokenizerFile
from .qwen25vl_tables import mrope_cos_sin, vision_tables
from .vision_onnx import make_session

DECODER_NEEDS = (DECODER_INPUTS - {"position_ids"}) | {"rotary_cos", "rotary_sin"}
GENERATION_FIELDS = frozenset(f.name for f in fields(fam.GENERATION_DEFAULTS))
VISION_INPUTS = ("patches", "window_index", "rotary_cos", "rotary_sin", "full_mask", "window_mask", "reverse_index")


def open_engine(model_dir, *, threads: int | None = None, providers=None, **ignored) -> "OnnxQwen25vlEngine":
    return OnnxQwen25vlEngine(model_dir, threads=threads, providers=providers)


class OnnxQwen25vlEngine(OnnxEngine):
    """vision.onnx + embed.onnx + decoder.onnx of the Qwen2.5-VL family (see base.Engine)."""

    family = fam.NAME

    def __init__(self, model_dir, threads: int | None = None, providers=None):   # noqa: D107 (not super's)
        self.folder = Path(model_dir)
        manifest = read_manifest(self.folder)
        if manifest.get("format") != "onnx" or manifest.get("family") != fam.NAME:
            raise ModelFormatError(f"{self.folder} holds a {manifest.get('format')!r} model of the family "
                                   f"{manifest.get('family', 'llava')!r}, not an ONNX Qwen2.5-VL one; convert it "
                                   "with `huatuo-lite convert onnx`.")
        check_sizes(self.folder, manifest)
        graphs = manifest["onnx"]["graphs"]
        self.vision = make_session(self.folder / graphs["vision"], threads, providers)
        self.embed = make_session(self.folder / graphs["embed"], threads, providers)
        self.decoder = make_session(self.folder / graphs["decoder"], threads, providers)
        self.tokenizer = TokenizerFile(self.folder / TOKENIZER_FILE)
        text, vision = manifest["text"], manifest["vision"]
        self.hidden_size, self.vocab_rows = int(text["n_embd"]), int(text["n_vocab"])
        self.n_ctx = int(text["n_ctx"])
        self.eos_token_ids = frozenset(int(i) for i in text["eos_token_ids"])
        self.rope = (int(text["head_dim"]), float(text["rope_theta"]), tuple(text["mrope_section"]))
        self.vision_facts = (int(vision["head_dim"]), int(vision["window_size"]), int(vision["patch_size"]))
        self.image_pixels = (int(manifest["image"]["min_pixels"]), int(manifest["image"]["max_pixels"]))
        # the checkpoint's generation_config as converted, over the family's defaults
        recorded = {k: v for k, v in (manifest.get("generation") or {}).items() if k in GENERATION_FIELDS}
        self.generation_defaults = fam.GENERATION_DEFAULTS.with_overrides(**recorded)
        self.quant = manifest["onnx"]["quant"]
        self._check_graphs(graphs)
        inputs = {i.name: i.shape for i in self.decoder.get_inputs()}
        self._past_names = [name for name in inputs if name.startswith("past_key_values.")]
        self._present_names = [n.replace("past_key_values.", "present.") for n in self._past_names]
        kv_shape = inputs[self._past_names[0]]                # [B, kvh, P, hd], kvh and hd static
        self._kv_heads, self._head_dim = int(kv_shape[1]), int(kv_shape[3])
        self._past: list | None = None
        self._manifest, self._providers = manifest, list(providers or [])
        self._cached_keys: list = []
        self.reused_positions = 0

    def _check_graphs(self, graphs: dict) -> None:
        decoder = {i.name for i in self.decoder.get_inputs()}
        vision = {i.name for i in self.vision.get_inputs()}
        for role, have, need in (("decoder", decoder, DECODER_NEEDS), ("vision", vision, set(VISION_INPUTS))):
            if not need <= have or (role == "decoder" and not any(n.startswith("past_key_values.") for n in have)):
                raise ModelFormatError(f"{self.folder / graphs[role]} is not a Qwen2.5-VL {role} graph (it lacks "
                                       f"{sorted(need - have)[:3]}); convert the model again.")

    # ------------------------------------------------------------- images ----
    def encode_images(self, pixels) -> list:
        """A list of normalized float32 [3, h, w] (h, w multiples of 28) -> a list of [T_i, H]
        (T_i = h/28 * w/28, merger output order as model.visual returns it)."""
        head_dim, window, patch = self.vision_facts
        out = []
        for image in pixels:
            image = np.asarray(image, dtype=np.float32)
            if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] % fam.FACTOR or image.shape[2] % fam.FACTOR:
                raise PromptError(f"A Qwen2.5-VL image must be [3, h, w] with h and w multiples of {fam.FACTOR}, "
                                  f"got {list(image.shape)}: preprocess it with smart_resize.")
            patches, (_, gh, gw) = fam.patchify(image)
            tables = vision_tables(gh, gw, head_dim, window, patch)
            feeds = {"patches": patches, "window_index": tables.window_index, "rotary_cos": tables.cos,
                     "rotary_sin": tables.sin, "full_mask": tables.full_mask, "window_mask": tables.window_mask,
                     "reverse_index": tables.reverse_index}
            (features,) = self.vision.run(None, feeds)
            out.append(features.astype(np.float32, copy=False))
        return out

    # ------------------------------------------------------------- decode ----
    # OnnxEngine's prefill/step with this family's positions: 3-D (families.qwen25vl.positions),
    # fed as the M-RoPE rotary table computed in numpy.
    position_streams = 3

    def _prompt_positions(self, segments: Sequence[Segment]) -> tuple[np.ndarray, int]:
        return mrope_positions(segments)                                       # [3, L], next position

    def _position_feeds(self, positions: np.ndarray) -> dict:
        cos, sin = mrope_cos_sin(positions, *self.rope)                          # [L, hd] each
        return {"rotary_cos": cos[None], "rotary_sin": sin[None]}

    def close(self) -> None:
        self._past = None
        self.embed = self.decoder = self.vision = None
