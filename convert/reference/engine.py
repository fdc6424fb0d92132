"""The numerical reference: transformers' LlavaForConditionalGeneration in torch.

Slow and memory-hungry (float32 by default: ~32 GB for the 7B) but built only
from transformers' own classes, so the GGUF and ONNX ports are measured against
it. Needs the `convert` extra (torch, transformers); loaded lazily by
`huatuo_lite.backends.load_backend("torch")`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from huatuo_lite.errors import ImageError, PromptError
from huatuo_lite.families.llava import CONTEXT_LENGTH
from huatuo_lite.backends.base import ImageEmbeds, Segment, segments_length
from huatuo_lite.backends.token_pieces import PIECE_DECODERS
from .build import build_model, torch_dtype


# family -> the module whose open_engine runs it, for the families other than LLaVA (this
# module's TorchEngine); by name, as they build on this one
FAMILY_ENGINES = {"qwen25vl": "huatuo_lite.convert.qwen25vl.reference"}


def open_engine(model_dir, *, dtype: str = "float32", threads: int | None = None,
                attn_implementation: str = "sdpa", **ignored):
    """Open an upstream HuatuoGPT-Vision folder (any variant or family) as a reference engine."""
    from huatuo_lite.convert.checkpoint.read import open_checkpoint

    from huatuo_lite.convert.checkpoint.family import folder_family

    module = FAMILY_ENGINES.get(folder_family(model_dir))
    if module is not None:
        import importlib

        return importlib.import_module(module).open_engine(model_dir, dtype=dtype, threads=threads,
                                                           attn_implementation=attn_implementation)
    if threads:
        torch.set_num_threads(int(threads))
    return TorchEngine(open_checkpoint(model_dir), dtype=dtype, attn_implementation=attn_implementation)


# ------------------------------------------------------------ token bytes ----
def tokenizer_kind(tok) -> str:
    """'byte_level' (GPT-2/Qwen2 BPE) or 'sentencepiece' (Llama/Yi), read from the
    tokenizer's own decoder, never from a model name."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: sentencepiece-backed ones hold sp_model
        return "sentencepiece" if hasattr(tok, "sp_model") else "byte_level"
    decoder = backend.decoder
    described = repr(decoder) if decoder is not None else ""
    return "byte_level" if "ByteLevel" in described else "sentencepiece"


def token_bytes_table(tok, n_rows: int) -> list[bytes]:
    """Raw bytes for every embedding row id. Rows past the tokenizer's vocabulary
    have no text (b""); so have special tokens (<|endoftext|>, <image>), as
    upstream decodes with skip_special_tokens=True; other added tokens are
    stored as plain text, not as byte-level or SentencePiece pieces."""
    decode_piece = PIECE_DECODERS[tokenizer_kind(tok)]
    added = {i: b"" if t.special else t.content.encode("utf-8") for i, t in tok.added_tokens_decoder.items()}
    pieces = tok.convert_ids_to_tokens(list(range(min(n_rows, len(tok)))))
    table = []
    for i, piece in enumerate(pieces):
        if i in added:
            table.append(added[i])
        else:
            table.append(decode_piece(piece) if piece is not None else b"")
    return table + [b""] * (n_rows - len(table))


# ----------------------------------------------------------------- engine ----
def _eos_ids(ckpt, tok) -> frozenset:
    """eos from config.json and generation_config.json (int or list); the
    tokenizer's eos only when neither names one."""
    import json

    ids = set()
    sources = [ckpt.text.eos_token_id]
    gen_path = ckpt.root / "generation_config.json"
    if gen_path.is_file():
        sources.append(json.loads(gen_path.read_text(encoding="utf-8")).get("eos_token_id"))
    for value in sources:
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if not ids and tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return frozenset(int(i) for i in ids)


class TorchEngine:
    """One Llava model in torch with one DynamicCache (see base.Engine)."""

    name = "torch"

    def __init__(self, ckpt, *, dtype: str = "float32", attn_implementation: str = "sdpa"):
        from huatuo_lite.convert.checkpoint.tokenizer import open_tokenizer

        self.checkpoint = ckpt
        self.dtype = torch_dtype(dtype)
        self.model = build_model(ckpt, self.dtype, attn_implementation)
        self.tokenizer = open_tokenizer(ckpt.tokenizer_dir)   # 4.x or transformers-5 files
        self.hidden_size = ckpt.text.hidden_size
        self.vocab_rows = ckpt.text.vocab_size
        max_len = ckpt.config.get("tokenizer_model_max_length") or CONTEXT_LENGTH
        self.n_ctx = int(min(max_len, ckpt.text.max_position_embeddings))
        self.eos_token_ids = _eos_ids(ckpt, self.tokenizer)
        self.image_size = ckpt.vision.image_size
        self._token_bytes = token_bytes_table(self.tokenizer, self.vocab_rows)
        self._cache = None

    # --------------------------------------------------------------- text ----
    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes[token_id] if 0 <= token_id < len(self._token_bytes) else b""

    # ------------------------------------------------------------- images ----
    @torch.inference_mode()
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, S, S] normalized pixels -> [N, T, H] float32 projected features."""
        pixels = np.asarray(pixel_values, dtype=np.float32)
        want = (3, self.image_size, self.image_size)
        if pixels.ndim != 4 or pixels.shape[1:] != want:
            raise ImageError(f"Pixel values must have shape [N, {', '.join(map(str, want))}], got {list(pixels.shape)}.")
        features = self.model.model.get_image_features(torch.from_numpy(pixels).to(self.dtype))
        return torch.stack(features).float().numpy()

    # -------------------------------------------------------------- decode ----
    def _embed(self, segments: Sequence[Segment]) -> torch.Tensor:
        """Token chunks through the input embeddings, image features spliced in
        between: [1, L, H]."""
        embed = self.model.get_input_embeddings()
        parts = []
        for segment in segments:
            if isinstance(segment, ImageEmbeds):
                features = torch.as_tensor(np.asarray(segment.features, dtype=np.float32))
                if features.ndim != 2 or features.shape[1] != self.hidden_size:
                    raise PromptError(f"Image features must be [T, {self.hidden_size}], got {list(features.shape)}.")
                parts.append(features.to(self.dtype))
            elif len(segment):
                parts.append(embed(self._token_tensor(segment)))
        return torch.cat(parts, dim=0).unsqueeze(0)

    def _token_tensor(self, ids) -> torch.Tensor:
        tokens = torch.as_tensor(list(ids), dtype=torch.long)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_rows):
            raise PromptError(f"Token ids must lie in [0, {self.vocab_rows}); got one outside.")
        return tokens

    def _run(self, embeds: torch.Tensor, all_logits: bool) -> np.ndarray:
        """The language model over embeds [1, L, H] with the kept cache -> float32 logits."""
        out = self.model.model.language_model(inputs_embeds=embeds, past_key_values=self._cache, use_cache=True)
        hidden = out.last_hidden_state[0]                     # [L, H]
        hidden = hidden if all_logits else hidden[-1:]       # only the last row is needed
        logits = self.model.lm_head(hidden).float().numpy()  # [L or 1, V]
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def prefill(self, segments: Sequence[Segment], all_logits: bool = False) -> np.ndarray:
        from transformers import DynamicCache

        length = segments_length(segments)
        if length == 0:
            raise PromptError("The prompt is empty: give at least one token.")
        if length > self.n_ctx:
            raise PromptError(f"The prompt has {length} positions but the context holds {self.n_ctx}: shorten it.")
        embeds = self._embed(segments)
        self._cache = DynamicCache(config=self.model.config.text_config)
        return self._run(embeds, all_logits)

    @torch.inference_mode()
    def step(self, token_id: int) -> np.ndarray:
        if self._cache is None:
            raise PromptError("step() needs a prefill() first.")
        if self._cache.get_seq_length() >= self.n_ctx:
            raise PromptError(f"The context of {self.n_ctx} tokens is full.")
        embeds = self.model.get_input_embeddings()(self._token_tensor([int(token_id)])).unsqueeze(0)
        return self._run(embeds, all_logits=False)

    def close(self) -> None:
        self._cache = None
        self.model = None
