"""The numerical reference for the Qwen2.5-VL family: transformers' own
Qwen2_5_VLForConditionalGeneration in torch (float32 by default), behind the engine
protocol (huatuo_lite/backends/base.py), so the GGUF and ONNX ports are measured
against it.

- encode_images: each normalized image [3, h, w] (h, w multiples of 28) is flattened by
  families.qwen25vl.patchify (exactly as Qwen2VLImageProcessor) and all go through
  model.visual(patches, grid_thw) in one call, as HF's forward does -> [T_i, H] each,
  T_i = (h/28)*(w/28), in the merger's output order.
- prefill: token embeddings with the image features spliced in; 3-D M-RoPE positions
  from base.mrope_positions (families.qwen25vl.positions: get_rope_index's rule); an
  ImageEmbeds segment must carry `.grid` = (rows, cols). step(token) continues at the next position on all three
  streams, as HF generate does with its rope_deltas.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from huatuo_lite.backends.base import ImageEmbeds, Segment, mrope_positions, segments_length
from huatuo_lite.errors import ImageError, PromptError
from huatuo_lite.families import qwen25vl as fam

from ..reference.build import torch_dtype
from ..reference.engine import token_bytes_table
from .checkpoint import open_qwen25vl


def open_engine(model_dir, *, dtype: str = "float32", threads: int | None = None,
                attn_implementation: str = "sdpa", **ignored) -> "QwenTorchEngine":
    """Open an upstream Qwen2.5-VL folder (either tensor layout) as a reference engine."""
    if threads:
        torch.set_num_threads(int(threads))
    return QwenTorchEngine(open_qwen25vl(model_dir), dtype=dtype, attn_implementation=attn_implementation)


def _check_image(segment: ImageEmbeds, hidden: int) -> None:
    """An image segment must carry its grid, and its features [rows*cols, H]."""
    if segment.grid is None:
        raise PromptError("An image segment for Qwen2.5-VL needs its grid (rows, cols) to place its positions.")
    rows, cols = (int(g) for g in segment.grid)
    shape = np.shape(segment.features)
    if shape != (rows * cols, hidden):
        raise PromptError(f"Image features for a {rows}x{cols} grid must be [{rows * cols}, {hidden}], "
                          f"got {list(shape)}.")


class QwenTorchEngine:
    """One Qwen2.5-VL model in torch with one DynamicCache (see base.Engine)."""

    name = "torch"
    family = fam.NAME

    def __init__(self, ckpt, *, dtype: str = "float32", attn_implementation: str = "sdpa"):
        from transformers import Qwen2_5_VLForConditionalGeneration

        from ..checkpoint.tokenizer import open_tokenizer

        self.checkpoint = ckpt
        self.dtype = torch_dtype(dtype)
        # transformers maps either tensor layout onto its modules itself (_checkpoint_conversion_mapping).
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(ckpt.root), dtype=self.dtype, attn_implementation=attn_implementation).eval()
        self.tokenizer = open_tokenizer(ckpt.tokenizer_dir)
        self.hidden_size = ckpt.text.hidden_size
        self.vocab_rows = ckpt.text.vocab_size
        self.n_ctx = int(min(fam.CONTEXT_LENGTH, ckpt.text.max_position_embeddings))
        eos = ckpt.eos_token_ids or ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        self.eos_token_ids = frozenset(int(i) for i in eos)
        self.image_pixels = ckpt.image_pixels                      # (min_pixels, max_pixels)
        self.image_token_id = ckpt.ids.image
        self._token_bytes = token_bytes_table(self.tokenizer, self.vocab_rows)
        self._cache = None
        self._next = 0          # the position the next token takes (all three streams)

    # --------------------------------------------------------------- text ----
    def tokenize(self, text: str) -> list[int]:
        """No special tokens added; special-token text (<|im_start|>, ...) is parsed."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes[token_id] if 0 <= token_id < len(self._token_bytes) else b""

    # ------------------------------------------------------------- images ----
    @torch.inference_mode()
    def encode_images(self, pixels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """A list of float32 [3, h, w] normalized images -> a list of float32 [T_i, H]."""
        images = [np.asarray(p, dtype=np.float32) for p in pixels]
        if not images:
            return []
        bad = next((p.shape for p in images if p.ndim != 3 or p.shape[0] != 3 or p.shape[1] % fam.FACTOR
                    or p.shape[2] % fam.FACTOR or not p.shape[1] or not p.shape[2]), None)
        if bad is not None:
            raise ImageError(f"Qwen2.5-VL pixel values must be [3, h, w] with h and w multiples of {fam.FACTOR}, "
                             f"got {list(bad)}.")
        flat = [fam.patchify(p) for p in images]           # ([h/14*w/14, 1176], (1, h/14, w/14)) each
        patches = torch.from_numpy(np.concatenate([f[0] for f in flat])).to(self.dtype)
        grid_thw = torch.tensor([f[1] for f in flat], dtype=torch.long)
        features = self.model.model.visual(patches, grid_thw=grid_thw)      # [sum T_i, H]
        sizes = [fam.image_tokens(p) for p in images]
        return [f.float().numpy() for f in torch.split(features, sizes)]

    # -------------------------------------------------------------- decode ----
    def _token_tensor(self, ids) -> torch.Tensor:
        tokens = torch.as_tensor(list(ids), dtype=torch.long)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_rows):
            raise PromptError(f"Token ids must lie in [0, {self.vocab_rows}); got one outside.")
        return tokens

    def _embed(self, segments: Sequence[Segment]) -> torch.Tensor:
        """[1, L, H]: token embeddings, image features in place of their positions."""
        embed = self.model.get_input_embeddings()
        parts = []
        for segment in segments:
            if isinstance(segment, ImageEmbeds):
                parts.append(torch.as_tensor(np.asarray(segment.features, dtype=np.float32)).to(self.dtype))
            elif len(segment):
                parts.append(embed(self._token_tensor(segment)))
        return torch.cat(parts, dim=0).unsqueeze(0)

    def _run(self, embeds: torch.Tensor, positions: np.ndarray, all_logits: bool) -> np.ndarray:
        """The language model over embeds [1, L, H] at positions int64 [3, L] with the kept cache."""
        position_ids = torch.from_numpy(positions).unsqueeze(1)             # [3, 1, L]
        out = self.model.model.language_model(inputs_embeds=embeds, position_ids=position_ids,
                                              past_key_values=self._cache, use_cache=True)
        hidden = out.last_hidden_state[0]
        hidden = hidden if all_logits else hidden[-1:]
        logits = self.model.lm_head(hidden).float().numpy()                # [L or 1, V]
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def prefill(self, segments: Sequence[Segment], all_logits: bool = False) -> np.ndarray:
        from transformers import DynamicCache

        length = segments_length(segments)
        if length == 0:
            raise PromptError("The prompt is empty: give at least one token.")
        if length > self.n_ctx:
            raise PromptError(f"The prompt has {length} positions but the context holds {self.n_ctx}: shorten it.")
        for segment in segments:
            if isinstance(segment, ImageEmbeds):
                _check_image(segment, self.hidden_size)
        positions, nxt = mrope_positions(segments)          # int64 [3, L], the next position
        embeds = self._embed(segments)
        self._cache = DynamicCache(config=self.model.config.text_config)
        logits = self._run(embeds, positions, all_logits)
        self._next = nxt
        return logits

    @torch.inference_mode()
    def step(self, token_id: int) -> np.ndarray:
        if self._cache is None:
            raise PromptError("step() needs a prefill() first.")
        if self._cache.get_seq_length() >= self.n_ctx:
            raise PromptError(f"The context of {self.n_ctx} tokens is full.")
        embeds = self.model.get_input_embeddings()(self._token_tensor([int(token_id)])).unsqueeze(0)
        logits = self._run(embeds, np.full((3, 1), self._next, dtype=np.int64), all_logits=False)
        self._next += 1
        return logits

    def close(self) -> None:
        self._cache = None
        self.model = None


__all__ = ["QwenTorchEngine", "open_engine"]
