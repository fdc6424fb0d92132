"""Broken image files (and the bytes they are built from) that every input path must refuse."""
from __future__ import annotations

import io
import struct
import zlib
import numpy as np
from PIL import Image


def _noise(height, width, channels, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


# --------------------------------------------------------- bad input ----
def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def _png_header_only(width, height) -> bytes:
    """A PNG whose IHDR claims width x height, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def _encoded(fmt, size=(120, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(size[1], size[0], 3, seed=50)).save(buffer, fmt)
    return buffer.getvalue()


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


BAD_FILES = {
    "missing": (lambda tmp: tmp / "nope.png", "Cannot find the image file"),
    "folder": (lambda tmp: tmp, "is a folder"),
    "empty": (lambda tmp: _write(tmp, "empty.png", b""), "is empty (0 bytes)"),
    "text_as_png": (lambda tmp: _write(tmp, "notes.png", b"patient notes, not pixels\n" * 5),
                    "is not an image"),
    "truncated_png": (lambda tmp: _write(tmp, "cut.png", _encoded("PNG")[:-300]),
                      "truncated or damaged"),
    "truncated_jpeg": (lambda tmp: _write(tmp, "cut.jpg", _encoded("JPEG")[:700]),
                       "truncated or damaged"),
    "bomb_header": (lambda tmp: _write(tmp, "bomb.png", _png_header_only(30000, 30000)),
                    "decompression bombs"),
}
