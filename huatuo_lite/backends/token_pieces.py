"""Vocabulary pieces -> the raw bytes they stand for (shared by the torch and
ONNX backends; llama.cpp has its own token_to_piece).

The generation loop decodes streamed text incrementally from raw bytes, so this
must be exact: byte-level BPE (GPT-2/Qwen2) writes each byte as a printable
stand-in character; SentencePiece (Llama/Yi) writes spaces as U+2581 and unknown
bytes as "<0xNN>"."""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def gpt2_byte_decoder() -> dict:
    """GPT-2's bytes_to_unicode, inverted: printable stand-in char -> raw byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:                       # unprintable bytes are shifted past 255, in order
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


def byte_level_bytes(piece: str) -> bytes:
    decoder = gpt2_byte_decoder()
    return bytes(decoder[ch] for ch in piece)


def sentencepiece_bytes(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


# tokenizer kind -> how one vocabulary piece maps back to its raw bytes
PIECE_DECODERS = {"byte_level": byte_level_bytes, "sentencepiece": sentencepiece_bytes}
