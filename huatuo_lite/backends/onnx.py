"""The onnxruntime backend: embed.onnx + decoder.onnx with a numpy KV cache,
vision.onnx for images (see convert/onnx/export.py for the graphs).

No torch, no transformers: the tokenizer is tokenizer.json read by the
`tokenizers` library. Sampling is not here: the shared loop
(huatuo_lite.generate) samples from the logits this engine returns.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ModelFormatError, PromptError
from ..families import family_module
from ..manifest import check_sizes, read_manifest
from .token_pieces import PIECE_DECODERS
from .base import ImageEmbeds, Segment, common_prefix, drop_positions, position_keys, segments_length
from .state import file_identity, segment_boundary
from .vision_onnx import LazyVision, make_session

PREFILL_CHUNK = 512      # positions per decoder call in prefill: bounds the [L, V] logits buffer
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
DECODER_INPUTS = {"inputs_embeds", "attention_mask", "position_ids"}


# manifest "family" -> the module whose open_engine runs that family's graphs (imported by
# name: those modules build on this one)
FAMILY_ENGINES = {"qwen25vl": "huatuo_lite.backends.onnx_qwen25vl"}


def open_engine(model_dir, *, threads: int | None = None, providers=None, **ignored) -> "OnnxEngine":
    """Open a folder written by `huatuo-lite convert onnx` (the engine of its family)."""
    family = read_manifest(Path(model_dir)).get("family")
    family_module(family)                 # a family this version does not know: one sentence
    if family in FAMILY_ENGINES:
        import importlib

        return importlib.import_module(FAMILY_ENGINES[family]).open_engine(model_dir, threads=threads,
                                                                           providers=providers)
    return OnnxEngine(model_dir, threads=threads, providers=providers)


# ------------------------------------------------------------ tokenizer ----
class TokenizerFile:
    """tokenizer.json through `tokenizers`: ids without special tokens, and the
    exact raw bytes of each token (for incremental UTF-8 decoding)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ModelFormatError(f"{path} cannot be read as a tokenizer ({exc}); convert the model again.") from None
        decoder = json.dumps(json.loads(self.tokenizer.to_str()).get("decoder"))
        self.kind = "byte_level" if "ByteLevel" in decoder else "sentencepiece"
        # Special tokens (<|endoftext|>, <unk>, <image>) have no text, as upstream decodes
        # with skip_special_tokens=True; other added tokens are their plain text.
        specials = self._special_ids(path.with_name(TOKENIZER_CONFIG_FILE))
        self.added = {i: b"" if t.special or i in specials else t.content.encode("utf-8")
                      for i, t in self.tokenizer.get_added_tokens_decoder().items()}
        self.added.update({i: b"" for i in specials})
        self._bytes: dict = {}

    def _special_ids(self, config_path: Path) -> set:
        """Ids transformers counts as special: tokenizer_config.json's special added
        tokens and its named bos/eos/unk/pad tokens (these may live in the model's
        own vocabulary, like SentencePiece's <unk>, not among the added tokens)."""
        if not config_path.is_file():
            return set()
        config = json.loads(config_path.read_text(encoding="utf-8"))
        ids = {int(i) for i, t in config.get("added_tokens_decoder", {}).items() if t.get("special")}
        for key in SPECIAL_TOKEN_KEYS:
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            token_id = self.tokenizer.token_to_id(token) if isinstance(token, str) else None
            if token_id is not None:
                ids.add(token_id)
        return ids

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._piece_bytes(token_id)
        return cached

    def _piece_bytes(self, token_id: int) -> bytes:
        if token_id in self.added:            # added tokens are stored as plain text
            return self.added[token_id]
        piece = self.tokenizer.id_to_token(token_id) if token_id >= 0 else None
        return PIECE_DECODERS[self.kind](piece) if piece is not None else b""


# ----------------------------------------------------------------- engine ----
class OnnxEngine:
    """embed.onnx + decoder.onnx + vision.onnx with one numpy KV cache (see base.Engine)."""

    name = "onnx"

    def __init__(self, model_dir, threads: int | None = None, providers=None):
        self.folder = Path(model_dir)
        manifest = read_manifest(self.folder)
        if manifest.get("format") != "onnx":
            raise ModelFormatError(f"{self.folder} holds a {manifest.get('format')!r} model, not an ONNX one; "
                                   "use the matching --backend or convert with `huatuo-lite convert onnx`.")
        check_sizes(self.folder, manifest)
        graphs = manifest["onnx"]["graphs"]
        text = manifest["text"]
        if not (self.folder / graphs["vision"]).is_file():   # the rest of its checks at the first image
            raise ModelFormatError(f"{self.folder / graphs['vision']} is missing; convert the model again or "
                                   "copy the whole model folder.")
        self.vision = LazyVision(self.folder / graphs["vision"], int(text["n_embd"]), threads, providers)
        self.embed = make_session(self.folder / graphs["embed"], threads, providers)
        self.decoder = make_session(self.folder / graphs["decoder"], threads, providers)
        self.tokenizer = TokenizerFile(self.folder / TOKENIZER_FILE)
        self.hidden_size, self.vocab_rows = int(text["n_embd"]), int(text["n_vocab"])
        self.n_ctx = int(text["n_ctx"])
        self.eos_token_ids = frozenset(int(i) for i in text["eos_token_ids"])
        self.quant = manifest["onnx"]["quant"]
        inputs = {i.name: i.shape for i in self.decoder.get_inputs()}
        self._past_names = [name for name in inputs if name.startswith("past_key_values.")]
        if not self._past_names or not DECODER_INPUTS <= set(inputs):
            raise ModelFormatError(f"{self.folder / graphs['decoder']} is not a decoder graph with a KV cache "
                                   f"(inputs {sorted(inputs)[:5]}...); convert the model again.")
        self._present_names = [n.replace("past_key_values.", "present.") for n in self._past_names]
        kv_shape = inputs[self._past_names[0]]                # [B, kvh, P, hd], kvh and hd static
        self._kv_heads, self._head_dim = int(kv_shape[1]), int(kv_shape[3])
        self._past: list | None = None                       # [1, kvh, P, hd] float32 per name
        self._manifest, self._providers = manifest, list(providers or [])
        self._cached_keys: list = []                         # position keys of what _past holds
        self._next_position = 0                              # where step() continues
        self.reused_positions = 0

    # --------------------------------------------------------------- text ----
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def token_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(int(token_id)) if 0 <= token_id < self.vocab_rows else b""

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vision.encode(pixel_values)

    # -------------------------------------------------------------- decode ----
    def _embed_ids(self, ids) -> np.ndarray:
        tokens = np.asarray(list(ids), dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_rows):
            raise PromptError(f"Token ids must lie in [0, {self.vocab_rows}); got one outside.")
        (embeds,) = self.embed.run(None, {"input_ids": tokens[None]})
        return embeds[0]                                      # [L, H]

    def _embed_segments(self, segments: Sequence[Segment]) -> np.ndarray:
        """Token chunks through embed.onnx, image features spliced in between: [L, H]."""
        parts = []
        for segment in segments:
            if isinstance(segment, ImageEmbeds):
                features = np.asarray(segment.features, dtype=np.float32)
                if features.ndim != 2 or features.shape[1] != self.hidden_size:
                    raise PromptError(f"Image features must be [T, {self.hidden_size}], got {list(features.shape)}.")
                parts.append(features)
            elif len(segment):
                parts.append(self._embed_ids(segment))
        return np.concatenate(parts, axis=0)

    position_streams = 1   # rows of _prompt_positions' array

    # Positions: the family's hook pair. LLaVA: 1-D, one stream [1, L]; Qwen2.5-VL overrides both
    # (3-D M-RoPE positions [3, L] fed as rotary tables).
    def _prompt_positions(self, segments: Sequence[Segment]) -> tuple[np.ndarray, int]:
        """Positions int64 [streams, L] of the whole prompt and the position the next token takes."""
        length = segments_length(segments)
        return np.arange(length, dtype=np.int64)[None], length

    def _position_feeds(self, positions: np.ndarray) -> dict:
        return {"position_ids": positions[:1]}                 # [1, L]: batch of one

    def _run(self, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Decoder over embeds [L, H] at `positions` [streams, L] after the kept cache -> logits
        [L, V]; grows the cache."""
        past_len = self._past[0].shape[2]
        length = embeds.shape[0]
        feeds = {
            "inputs_embeds": embeds[None].astype(np.float32, copy=False),
            "attention_mask": np.ones((1, past_len + length), np.int64),
            **self._position_feeds(positions),
            **dict(zip(self._past_names, self._past)),
        }
        outputs = self.decoder.run(["logits", *self._present_names], feeds)
        self._past = outputs[1:]
        return outputs[0][0]

    def _empty_cache(self) -> list:
        return [np.zeros((1, self._kv_heads, 0, self._head_dim), np.float32) for _ in self._past_names]

    def prefill(self, segments: Sequence[Segment], all_logits: bool = False) -> np.ndarray:
        past, held = self._past, self._cached_keys
        self._past, self._cached_keys = None, []   # a failed prefill leaves no stale cache to step on
        length = segments_length(segments)
        if length == 0:
            raise PromptError("The prompt is empty: give at least one token.")
        if length > self.n_ctx:
            raise PromptError(f"The prompt has {length} positions but the context holds {self.n_ctx}: shorten it.")
        positions, next_position = self._prompt_positions(segments)          # [streams, L], all of the prompt
        keys = position_keys(segments)
        # Reuse whole segments of what the cache holds (the prefix of a follow-up question);
        # each segment runs as its own chunks, so the numbers are those of a cold prefill.
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

    # --------------------------------------------- persistent prefix (cache.py) ----
    def cache_identity(self) -> dict:
        """The graphs' digests, the quant and the execution providers (not threads)."""
        import onnxruntime

        graphs = self._manifest["onnx"]["graphs"]
        runtime = {"backend": "onnx", "onnxruntime": onnxruntime.__version__, "providers": self._providers,
                   "quant": self.quant}
        features = {**runtime, "vision": file_identity(self.folder, self._manifest, graphs["vision"])}
        # every other file (graphs, their external data, the tokenizer): all of them shape the KV
        text = [file_identity(self.folder, self._manifest, n)
                for n in sorted(self._manifest.get("files", {})) if n != graphs["vision"]]
        return {"features": features,
                "prefix": {**features, "text": text, "chunk": PREFILL_CHUNK, "n_ctx": self.n_ctx}}

    def held_positions(self, segments: Sequence[Segment]) -> int:
        if self._past is None:
            return 0
        n = 0
        for have, want in zip(self._cached_keys, position_keys(segments)):
            if have != want:
                break
            n += 1
        return n

    def export_prefix(self, segments: Sequence[Segment]) -> bytes | None:
        """The present key/value arrays ([1, kvh, P, hd] float32 each), which must hold exactly `segments`."""
        if self._past is None or self._cached_keys != position_keys(segments):
            return None
        buf = io.BytesIO()
        np.savez(buf, *self._past)
        return buf.getvalue()

    def import_prefix(self, payload: bytes, segments: Sequence[Segment]) -> bool:
        keys = position_keys(segments)
        self._past, self._cached_keys = None, []
        want = (1, self._kv_heads, len(keys), self._head_dim)
        try:
            with np.load(io.BytesIO(payload), allow_pickle=False) as data:
                arrays = [data[f"arr_{i}"] for i in range(len(data.files))]
        except (ValueError, OSError, EOFError, KeyError):
            return False
        if len(arrays) != len(self._past_names) or any(a.shape != want or a.dtype != np.float32 for a in arrays):
            return False
        self._past, self._cached_keys = arrays, keys
        return True

    def step(self, token_id: int) -> np.ndarray:
        if self._past is None:
            raise PromptError("step() needs a prefill() first.")
        if self._past[0].shape[2] >= self.n_ctx:
            raise PromptError(f"The context of {self.n_ctx} tokens is full.")
        here = np.full((self.position_streams, 1), self._next_position, np.int64)   # all streams alike
        logits = self._run(self._embed_ids([int(token_id)]), here)[-1].astype(np.float32, copy=False)
        self._cached_keys.append(int(token_id))
        self._next_position += 1
        return logits

    def close(self) -> None:
        self._past = None
        self.embed = self.decoder = None
        self.vision.close()
