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
from .base import ImageEmbeds, Segment, common_prefix, drop_positions, position_keys, segments_length
from .onnx import DECODER_INPUTS, PREFILL_CHUNK, TOKENIZER_FILE, OnnxEngine, TokenizerFile
from .qwen25vl_tables import mrope_cos_sin, vision_tables
from .state import segment_boundary
from .vision_onnx import make_session

DECODER_NEEDS = (DECODER_INPUTS - {"position_ids"}) | {"rotary_cos", "rotary_sin"}
GENERATION_FIELDS = frozenset(f.name for f in fields(fam.GENERATION_DEFAULTS))
VISION_INPUTS = ("patches", "window_index", "rotary_cos", "rotary_sin", "full_mask", "window_mask", "reverse_index")


def open_engine(model_dir, *, threads: int | None = None, providers=None, **ignored) -> "OnnxQwen25vlEngine":
    return OnnxQwen25vlEngine(model_dir, threads=threads, providers=providers)


def image_spans(segments: Sequence[Segment]) -> list:
    """Segments -> families.qwen25vl.Span runs; an image without its grid is one sentence."""
    spans = []
    for segment in segments:
        if not isinstance(segment, ImageEmbeds):
            spans.append(fam.Span(len(segment)))
            continue
        grid = getattr(segment, "grid", None)
        if grid is None or int(grid[0]) * int(grid[1]) != len(segment.features):
            raise PromptError(f"An image of {len(segment.features)} features has grid {grid}; Qwen2.5-VL's positions "
                              "need each image's (rows, cols) grid with rows*cols features: encode it again.")
        spans.append(fam.Span(len(segment.features), (int(grid[0]), int(grid[1]))))
    return spans


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
        self._next_position = 0                              # where step() continues (all 3 streams)
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
    def _run(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Decoder over embeds [L, H] at 3-D positions [3, L] after the kept cache -> logits [L, V]."""
        past_len, length = self._past[0].shape[2], embeds.shape[0]
        cos, sin = mrope_cos_sin(positions, *self.rope)
        feeds = {
            "inputs_embeds": embeds[None].astype(np.float32, copy=False),
            "attention_mask": np.ones((1, past_len + length), np.int64),
            "rotary_cos": cos[None], "rotary_sin": sin[None],
            **dict(zip(self._past_names, self._past)),
        }
        outputs = self.decoder.run(["logits", *self._present_names], feeds)
        self._past = outputs[1:]
        return outputs[0][0]

    def prefill(self, segments: Sequence[Segment], all_logits: bool = False) -> np.ndarray:
        past, held = self._past, self._cached_keys
        self._past, self._cached_keys = None, []   # a failed prefill leaves no stale cache to step on
        length = segments_length(segments)
        if length == 0:
            raise PromptError("The prompt is empty: give at least one token.")
        if length > self.n_ctx:
            raise PromptError(f"The prompt has {length} positions but the context holds {self.n_ctx}: shorten it.")
        positions, next_position = fam.positions(image_spans(segments))        # [3, L], all of the prompt
        keys = position_keys(segments)
        keep = 0 if all_logits or past is None else segment_boundary(segments, common_prefix(held, keys))
        self._past = [np.ascontiguousarray(a[:, :, :keep]) for a in past] if keep else self._empty_cache()
        self.reused_positions = keep
        rows, offset = [], keep
        for segment in drop_positions(segments, keep):
            embeds = self._embed_segments([segment])
            for start in range(0, len(embeds), PREFILL_CHUNK):
                chunk = embeds[start:start + PREFILL_CHUNK]
                logits = self._run(chunk, positions[:, offset:offset + len(chunk)])
                offset += len(chunk)
                rows.append(logits if all_logits else logits[-1:])
        self._cached_keys, self._next_position = keys, next_position
        logits = np.concatenate(rows, axis=0) if all_logits else rows[-1][0]
        return logits.astype(np.float32, copy=False)

    def step(self, token_id: int) -> np.ndarray:
        if self._past is None:
            raise PromptError("step() needs a prefill() first.")
        if self._past[0].shape[2] >= self.n_ctx:
            raise PromptError(f"The context of {self.n_ctx} tokens is full.")
        position = np.full((3, 1), self._next_position, np.int64)
        logits = self._run(self._embed_ids([int(token_id)]), position)[-1].astype(np.float32, copy=False)
        self._cached_keys.append(int(token_id))
        self._next_position += 1
        return logits

    def close(self) -> None:
        self._past = None
        self.embed = self.decoder = self.vision = None
