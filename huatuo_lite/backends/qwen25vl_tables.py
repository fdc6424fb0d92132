"""The size-dependent tables of the Qwen2.5-VL family, in numpy (no torch): what the
ONNX graphs take as inputs so that they stay plain stacks of transformer blocks.

Each follows transformers 4.57's Qwen2.5-VL code (names in brackets):
  vision_tables   one image's window order [get_window_index], 2-D rotary table
                  [rot_pos_emb], block-diagonal masks [cu_seqlens / cu_window_seqlens]
                  and the merger's way back to image order [argsort(window_index)]
  mrope_cos_sin   the text model's multimodal rotary cos/sin [Qwen2_5_VLRotaryEmbedding +
                  apply_multimodal_rotary_pos_emb's section pick] from 3-D positions
Angles are computed in float32 as transformers does (its products are float32 too).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..families.qwen25vl import MERGE_SIZE

MASKED = np.finfo(np.float32).min     # the additive "not visible" value, as transformers
VISION_ROPE_THETA = 10000.0           # Qwen2_5_VisionRotaryEmbedding's default, never configured


@dataclass(frozen=True)
class VisionTables:
    """Graph inputs for one image of gh x gw patches (P = gh*gw, M = P/4)."""

    window_index: np.ndarray    # [M] int64
    cos: np.ndarray             # [P, hd] float32, window order
    sin: np.ndarray             # [P, hd] float32
    full_mask: np.ndarray       # [P, P] float32 (0: one image)
    window_mask: np.ndarray     # [P, P] float32
    reverse_index: np.ndarray   # [M] int64


def window_order(gh: int, gw: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(window_index [M], window id of each merged token in window order [M]): merged tokens
    (row-major over the (gh/2, gw/2) grid) visited window by window (row-major windows of
    window_size/28 merged tokens a side, the last ones cut at the edge), row-major inside."""
    rows, cols = gh // MERGE_SIZE, gw // MERGE_SIZE
    side = window_size // MERGE_SIZE // patch_size          # 112 px -> 4 merged tokens
    order, window_id = [], []
    for n, (r0, c0) in enumerate((r, c) for r in range(0, rows, side) for c in range(0, cols, side)):
        r, c = np.meshgrid(np.arange(r0, min(r0 + side, rows)), np.arange(c0, min(c0 + side, cols)), indexing="ij")
        cell = (r * cols + c).reshape(-1)
        order.append(cell)
        window_id.append(np.full(cell.size, n))
    return np.concatenate(order).astype(np.int64), np.concatenate(window_id)


def vision_rotary(gh: int, gw: int, head_dim: int) -> np.ndarray:
    """Angles [P, hd/2] float32 in patchify order: the first half rotates by the patch's row,
    the second by its column, with inv_freq of a (hd/2)-dim rotary."""
    dim = head_dim // 2
    inv_freq = (1.0 / (np.float32(VISION_ROPE_THETA) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv_freq = inv_freq.astype(np.float32)
    # patch (row, col) in patchify order: 2x2 merge groups row-major, then row-major inside
    r = np.arange(gh).reshape(gh // MERGE_SIZE, MERGE_SIZE, 1, 1)
    c = np.arange(gw).reshape(1, 1, gw // MERGE_SIZE, MERGE_SIZE)
    rows = np.broadcast_to(r, (gh // MERGE_SIZE, MERGE_SIZE, gw // MERGE_SIZE, MERGE_SIZE)).transpose(0, 2, 1, 3)
    cols = np.broadcast_to(c, (gh // MERGE_SIZE, MERGE_SIZE, gw // MERGE_SIZE, MERGE_SIZE)).transpose(0, 2, 1, 3)
    table = np.outer(np.arange(max(gh, gw), dtype=np.float32), inv_freq).astype(np.float32)   # [max, hd/4]
    return np.concatenate([table[rows.reshape(-1)], table[cols.reshape(-1)]], axis=1)


def block_mask(groups: np.ndarray) -> np.ndarray:
    """[n, n] additive float32: 0 where two positions share a group, MASKED elsewhere."""
    return np.where(groups[:, None] == groups[None, :], np.float32(0), MASKED).astype(np.float32)


def vision_tables(gh: int, gw: int, head_dim: int, window_size: int, patch_size: int) -> VisionTables:
    """Every size-dependent input of vision.onnx for one image of grid (1, gh, gw)."""
    unit = MERGE_SIZE * MERGE_SIZE
    index, window_id = window_order(gh, gw, window_size, patch_size)
    angles = vision_rotary(gh, gw, head_dim)
    angles = angles.reshape(-1, unit, angles.shape[1])[index].reshape(gh * gw, -1)            # window order
    emb = np.concatenate([angles, angles], axis=1)                                            # [P, hd]
    patches = gh * gw
    return VisionTables(index, np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32),
                        np.zeros((patches, patches), np.float32), block_mask(np.repeat(window_id, unit)),
                        np.argsort(index).astype(np.int64))


def mrope_cos_sin(positions: np.ndarray, head_dim: int, rope_theta: float,
                  sections: tuple) -> tuple[np.ndarray, np.ndarray]:
    """positions int64 [3, L] (time, row, col) -> cos, sin float32 [L, hd]: NEOX layout
    (freqs twice), the channel chunks of `sections` (twice over, [16, 24, 24] for the 7B)
    taking the time, row, col stream in turn."""
    inv_freq = (1.0 / (np.float32(rope_theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                                  / np.float32(head_dim)))).astype(np.float32)
    freqs = positions.astype(np.float32)[:, :, None] * inv_freq[None, None, :]                 # [3, L, hd/2]
    emb = np.concatenate([freqs, freqs], axis=-1)                                             # [3, L, hd]
    stream = np.concatenate([np.full(size, i % 3) for i, size in enumerate(tuple(sections) * 2)])
    if stream.size != head_dim:
        raise ValueError(f"mrope_section {list(sections)} covers {stream.size // 2} rotary pairs, "
                         f"not the head's {head_dim // 2}")
    picked = emb[stream, :, np.arange(head_dim)].T                                            # [L, hd]
    return np.cos(picked).astype(np.float32), np.sin(picked).astype(np.float32)
