"""Calibration inputs of decoder.onnx for GPTQ (onnxruntime's GPTQWeightOnlyQuantConfig).

The text is what `convert gguf --imatrix` feeds llama-imatrix (gguf.imatrix.calibration_text:
PubMedVision or eval-format records rendered with the upstream prompt, every turn
answered, "<image>" marks dropped: text only), tokenized with the checkpoint's
tokenizer.json and cut into CHUNK_TOKENS windows, at most MAX_CHUNKS of them. Each
window becomes one decoder call from an empty cache:
  inputs_embeds [1, L, H] f32 (rows of the checkpoint's embedding table),
  attention_mask [1, L] i64, position_ids [1, L] i64,
  past_key_values.{i}.key/value [1, kvh, 0, hd] f32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from huatuo_lite.errors import HuatuoError

CHUNK_TOKENS = 512           # llama-imatrix's default chunk
MAX_CHUNKS = 32              # GPTQ's Hessians converge long before; each chunk is one session run


def calibration_windows(ckpt, calibration, chunk: int = CHUNK_TOKENS, max_chunks: int = MAX_CHUNKS) -> list:
    """Token id windows [L] from the calibration records."""
    from tokenizers import Tokenizer

    from ..gguf.imatrix import calibration_text

    text, _ = calibration_text(calibration)
    tokenizer_file = Path(ckpt.tokenizer_dir) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise HuatuoError(f"GPTQ calibration needs {tokenizer_file}; add a tokenizer.json to the checkpoint.")
    ids = np.asarray(Tokenizer.from_file(str(tokenizer_file)).encode(text, add_special_tokens=False).ids)
    windows = [ids[i:i + chunk] for i in range(0, len(ids), chunk)][:max_chunks]
    return [w for w in windows if len(w) >= 2]


class DecoderCalibration:
    """onnxruntime CalibrationDataReader over the windows (deep-copied by the quantizer)."""

    def __init__(self, ckpt, calibration):
        from .builder import EMBED_NAME

        t = ckpt.text
        table = ckpt.get(EMBED_NAME)                                   # [V, H] as stored
        hd = t.hidden_size // t.num_heads
        empty = np.zeros((1, t.num_kv_heads, 0, hd), np.float32)
        self.feeds = []
        for ids in calibration_windows(ckpt, calibration):
            length = len(ids)
            feed = {"inputs_embeds": table[ids].float().numpy()[None],
                    "attention_mask": np.ones((1, length), np.int64),
                    "position_ids": np.arange(length, dtype=np.int64)[None]}
            for i in range(t.num_layers):
                feed[f"past_key_values.{i}.key"] = feed[f"past_key_values.{i}.value"] = empty
            self.feeds.append(feed)
        if not self.feeds:
            raise HuatuoError(f"{calibration} gives no calibration text of two tokens or more; add records.")
        self._iter = iter(self.feeds)

    def get_next(self):
        return next(self._iter, None)

    def __iter__(self):
        return iter(self.feeds)

    def rewind(self):
        self._iter = iter(self.feeds)
