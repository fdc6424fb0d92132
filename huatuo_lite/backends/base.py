"""The small protocol every engine implements.

The generation loop (`huatuo_lite.generate`) is shared by all backends: it
renders the prompt, preprocesses images, and samples with the one sampler. An
engine only has to do four numeric things: tokenize, encode images, prefill a
sequence of text/embedding segments, and step one token at a time.

Shapes: V = vocabulary rows (embedding rows, may exceed the tokenizer's size),
H = text hidden size, T = 576 image tokens per image.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, Sequence, Union

import numpy as np


@dataclass(frozen=True)
class ImageEmbeds:
    """Projected image features to splice into the prompt: float32 [T, H].

    `key` names the content (the preprocessed pixels' digest) so that engines can
    recognise a prompt prefix they already hold in their KV cache."""

    features: np.ndarray
    key: str | None = None
    # (rows, cols) of the merged feature grid where the family's positions depend on
    # it (qwen25vl: 3-D M-RoPE positions); None for the LLaVA family's 1-D positions
    grid: tuple | None = None

    def content_key(self) -> str:
        if self.key is not None:
            return self.key
        return hashlib.sha256(np.ascontiguousarray(self.features).tobytes()).hexdigest()


Segment = Union[list, ImageEmbeds]   # list[int] token ids, or image features


class Engine(Protocol):
    """What a backend provides. One engine holds one model and one KV cache;
    callers serialise access (the API holds a lock)."""

    name: str            # "torch", "gguf", "onnx"
    n_ctx: int           # context length in tokens
    eos_token_ids: frozenset
    hidden_size: int     # H

    def tokenize(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added (upstream tokenizes each chunk so)."""

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (streamed text is decoded incrementally)."""

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, 336, 336] float32 normalized pixels -> [N, T, H] float32 features
        (CLIP hidden_states[-2] without CLS, then the mlp2x_gelu projector)."""

    def prefill(self, segments: Sequence[Segment], all_logits: bool = False) -> np.ndarray:
        """Reset the cache, run the whole prompt. Returns float32 logits [V] for
        the last position, or [L, V] for every position when all_logits."""

    def step(self, token_id: int) -> np.ndarray:
        """Append one token to the cache; float32 logits [V] for it."""

    def close(self) -> None:
        """Free the engine's native resources."""


def segments_length(segments: Sequence[Segment]) -> int:
    """Number of positions a prompt occupies."""
    return sum(len(s.features) if isinstance(s, ImageEmbeds) else len(s) for s in segments)


def mrope_positions(segments: Sequence[Segment], start: int = 0) -> tuple[np.ndarray, int]:
    """3-D positions int64 [3, L] of a prompt (families.qwen25vl's rule) and the next
    position; images must carry their grid."""
    from ..families.qwen25vl import Span, positions

    from ..errors import PromptError

    spans = []
    for seg in segments:
        if not isinstance(seg, ImageEmbeds):
            spans.append(Span(len(seg)))
            continue
        grid = seg.grid
        if grid is None or int(grid[0]) * int(grid[1]) != len(seg.features):
            raise PromptError(f"An image of {len(seg.features)} features has grid {grid}; Qwen2.5-VL's positions "
                              "need each image's (rows, cols) grid with rows*cols features: encode it again.")
        spans.append(Span(len(seg.features), (int(grid[0]), int(grid[1]))))
    return positions(spans, start)


def position_keys(segments: Sequence[Segment]) -> list:
    """One hashable key per prompt position: the token id, or (image key, row)."""
    keys: list = []
    for seg in segments:
        if isinstance(seg, ImageEmbeds):
            content = seg.content_key()
            keys.extend((content, row) for row in range(len(seg.features)))
        else:
            keys.extend(int(t) for t in seg)
    return keys


def common_prefix(cached: Sequence, wanted: Sequence) -> int:
    """Length of the shared prefix, leaving at least one position of `wanted` to
    evaluate (the engine needs its logits)."""
    limit = min(len(cached), len(wanted) - 1)
    n = 0
    while n < limit and cached[n] == wanted[n]:
        n += 1
    return n


def drop_positions(segments: Sequence[Segment], n: int) -> list:
    """The segments without their first `n` positions (a segment may be cut)."""
    out: list = []
    for seg in segments:
        size = len(seg.features) if isinstance(seg, ImageEmbeds) else len(seg)
        if n >= size:
            n -= size
            continue
        if isinstance(seg, ImageEmbeds):
            out.append(ImageEmbeds(seg.features[n:], seg.key, seg.grid))
        else:
            out.append(list(seg[n:]))
        n = 0
    return out
