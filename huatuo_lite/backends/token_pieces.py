"""Vocabulary pieces -> the raw bytes they stand for (shared by the torch and
ONNX backends; llama.cpp has its own token_to_piece).

The generation loop decodes streamed text incrementally from raw bytes, so this
must be exact: byte-level BPE (GPT-2/Qwen2) writes each byte as a printable
stand-in character; SentencePiece (Llama/Yi) writes spaces as U+2581 and unknown
bytes as "<0xNN>".

Why bytes and not tokenizers' DecodeStream (tokenizers 0.22), which streams text
from tokenizer.json: every backend hands the one loop bytes (llama.cpp's
token_to_piece gives nothing else), and the loop joins them with the standard
library's incremental UTF-8 decoder, so one path serves GGUF, ONNX and torch.
DecodeStream does not do the job as well on sampled tokens (measured on the tiny
checkpoints' tokenizer.json, 300 random sequences of 1-12 ids per vocabulary):
- SentencePiece byte-fallback (Yi/34B): 16 raised "Invalid prefix encountered
  while decoding stream" (an invalid byte such as <0xA0>, then any token); 15 lost
  or changed text mid-stream (ByteFallback turns valid ASCII bytes after a bad lead
  byte into U+FFFD, and it shows <unk>, which transformers skips as special);
- both vocabularies: a trailing unfinished character is never flushed, and with it
  go the complete characters decoded in the same step (byte-level / SentencePiece:
  24 / 6 sequences lost real characters, 54 / 41 only a trailing U+FFFD).
On whole text both agree with the full decode; the bytes path puts U+FFFD exactly
where invalid bytes stand and loses nothing (tests/backends/test_token_stream.py)."""
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
