"""The text model as a llama.cpp GGUF: hyper-parameters, tensor names, tokenizer.

7B (Qwen2) -> arch `qwen2`; 34B (Yi) -> arch `llama` (the arch, its rope kind and its
vocabulary kind per text architecture: huatuo_lite/families/text.py). Names come from
the gguf package's own table (gguf.TENSOR_NAMES); llama's rope is the interleaved kind,
so its q/k rows are permuted like convert_hf_to_gguf's LlamaModel.permute.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, GGUFWriter, TokenType

from huatuo_lite.errors import ModelFormatError
from huatuo_lite.families.llava import ANSWER_SUFFIX, ASSISTANT_TAG, IMAGE_LINE, IMAGE_PLACEHOLDER, USER_TAG
from huatuo_lite.families.text import TEXT_ARCHS
from huatuo_lite.llama_tools import MTMD_MARKER  # noqa: F401 - re-exported: the template's marker

from ..model_meta import add_general
from .stream import PlannedTensor, iter_mapped, weight_qtype, write_streaming_gguf

TEXT_ARCH = {a.name: MODEL_ARCH[a.gguf_arch] for a in TEXT_ARCHS.values()}   # TextConfig.arch -> GGUF arch

# canonical name (outside the layers) -> GGUF tensor
GLOBAL_TENSORS = {
    "model.embed_tokens": MODEL_TENSOR.TOKEN_EMBD,
    "model.norm": MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": MODEL_TENSOR.OUTPUT,
}
# canonical per-layer module -> GGUF tensor ("blk.{bid}....")
LAYER_TENSORS = {
    "input_layernorm": MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj": MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"(model\.embed_tokens|model\.norm|lm_head)\.(weight|bias)$")

# which heads count to permute q/k with when the arch's llama.cpp rope is the interleaved
# kind (HF rotate_half -> ggml rope); NEOX rope (qwen2) takes the HF layout as is
QK_HEADS = {MODEL_TENSOR.ATTN_Q: "num_heads", MODEL_TENSOR.ATTN_K: "num_kv_heads"}
PERMUTED_HEADS = {a.name: QK_HEADS if a.permute_qk else {} for a in TEXT_ARCHS.values()}


def gguf_name(canonical: str) -> tuple[str, MODEL_TENSOR] | None:
    """canonical checkpoint name -> (GGUF name, tensor kind); None for non-text tensors."""
    if m := _LAYER_RE.match(canonical):
        kind = LAYER_TENSORS.get(m.group(2))
        if kind is None:
            return None
        return f"{TENSOR_NAMES[kind].format(bid=int(m.group(1)))}.{m.group(3)}", kind
    if m := _GLOBAL_RE.match(canonical):
        kind = GLOBAL_TENSORS[m.group(1)]
        return f"{TENSOR_NAMES[kind]}.{m.group(2)}", kind
    return None


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """[n_head*D, ...] rows from HF's half-split rope order to llama.cpp's interleaved order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def chat_template() -> str:
    """Upstream's prompt as Jinja (llama.cpp's own engine, llama-cpp-python's jinja2), built
    from families/llava.py. A user turn: USER_TAG + (IMAGE_LINE per image + text, stripped) + newline
    + ASSISTANT_TAG; an earlier answer: its text + ANSWER_SUFFIX (as prompt.render).

    Content comes as a string or as OpenAI/HF-style parts, and images arrive three ways: an
    image part ("image"/"image_url", rendered as IMAGE_LINE), or libmtmd's marker inside text
    (llama-mtmd-cli prepends one marker per image to -p with NO newline; llama-server joins
    parts into such a string; MTMDChatHandler turns each image part into a text part that is
    the marker). Every marker, with one newline after it if there is one, is moved to the
    front as marker + newline, so libmtmd splices each image where upstream's <image> was.
    Text parts are joined with a newline (as the OpenAI route's message_parts)."""
    q = json.dumps   # a Jinja string literal with the same escapes as JSON
    marker, marker_line = q(MTMD_MARKER), q(IMAGE_LINE.replace(IMAGE_PLACEHOLDER, MTMD_MARKER))
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set ns = namespace(images='', text='') -%}"
        "{%- if message['content'] is string -%}{%- set parts = [message['content']] -%}"
        "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
        "{%- for part in parts -%}"
        "{%- if part is string -%}{%- set text = part -%}"
        "{%- elif part['type'] == 'text' -%}{%- set text = part['text'] -%}"
        "{%- else -%}{%- set text = '' -%}"
        "{%- if part['type'] in ['image', 'image_url'] -%}{%- set ns.images = ns.images + " + q(IMAGE_LINE) + " -%}"
        "{%- endif -%}{%- endif -%}"
        "{%- set chunks = text.replace(" + q(MTMD_MARKER + "\n") + ", " + marker + ").split(" + marker + ") -%}"
        "{%- for chunk in chunks -%}{%- if not loop.first -%}"
        "{%- set ns.images = ns.images + " + marker_line + " -%}{%- endif -%}{%- endfor -%}"
        "{%- set text = chunks | join('') -%}"
        "{%- if text and ns.text -%}{%- set ns.text = ns.text + " + q("\n") + " -%}{%- endif -%}"
        "{%- set ns.text = ns.text + text -%}"
        "{%- endfor -%}"
        "{{ " + q(USER_TAG) + " }}{{ (ns.images + ns.text) | trim }}{{ " + q("\n" + ASSISTANT_TAG) + " }}"
        "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{{ " + q(ANSWER_SUFFIX) + " }}"
        "{%- endif -%}{%- endfor -%}"
    )


# ------------------------------------------------------------- tensors ----
def text_plan(ckpt, qtype) -> list[PlannedTensor]:
    plan = []
    for name in ckpt.names():
        mapped = gguf_name(name)
        if mapped is not None:
            shape = tuple(ckpt.shape(name))
            plan.append(PlannedTensor(mapped[0], shape, weight_qtype(shape, qtype)))
    return plan


def text_arrays(ckpt):
    """(GGUF name, torch tensor in its stored dtype) for each text tensor, streamed
    shard by shard; q/k projections come back float32, rows permuted for rope."""
    import torch

    heads = {kind: getattr(ckpt.text, attr) for kind, attr in PERMUTED_HEADS[ckpt.text.arch].items()}

    def convert(name, tensor):
        mapped = gguf_name(name)
        if mapped is None:
            return None
        if mapped[1] in heads:      # [heads*head_dim, hidden]: at most hidden^2 floats
            tensor = torch.from_numpy(permute_rope(tensor.float().numpy(), heads[mapped[1]]))
        return mapped[0], tensor

    return iter_mapped(ckpt.iter_tensors(), convert)


# ------------------------------------------------------------ metadata ----
def add_hparams(w: GGUFWriter, text) -> None:
    w.add_context_length(text.max_position_embeddings)
    w.add_embedding_length(text.hidden_size)
    w.add_block_count(text.num_layers)
    w.add_feed_forward_length(text.intermediate_size)
    w.add_head_count(text.num_heads)
    w.add_head_count_kv(text.num_kv_heads)
    w.add_rope_dimension_count(text.hidden_size // text.num_heads)
    w.add_layer_norm_rms_eps(text.rms_norm_eps)
    w.add_rope_freq_base(text.rope_theta)
    w.add_vocab_size(text.vocab_size)


def _bpe_vocab(tokenizer_dir: Path, n_rows: int) -> dict:
    """Byte-level BPE (Qwen2): tokens, types, merges from tokenizer.json; rows past
    the tokenizer become [PAD{id}] (UNUSED), as convert_hf_to_gguf does."""
    vocab, merges, added = _bpe_files(tokenizer_dir)
    by_id = {i: (t, TokenType.NORMAL) for t, i in vocab.items()}
    for token_id, (content, special) in added.items():
        by_id[token_id] = (content, TokenType.CONTROL if special else TokenType.USER_DEFINED)
    tokens, types = _fill_rows(by_id, n_rows)
    return {"tokens": tokens, "types": types, "merges": merges}


def _bpe_files(tokenizer_dir: Path) -> tuple[dict, list, dict]:
    """(vocab, merges, {id: (content, special)}) from tokenizer.json, or else from the
    slow tokenizer's vocab.json + merges.txt + tokenizer_config.json."""
    fast = tokenizer_dir / "tokenizer.json"
    if fast.is_file():
        data = json.loads(fast.read_text(encoding="utf-8"))
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        added = {a["id"]: (a["content"], bool(a.get("special"))) for a in data.get("added_tokens", [])}
        return data["model"]["vocab"], merges, added
    try:
        vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
        lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    except OSError:
        raise ModelFormatError(f"{tokenizer_dir} has neither tokenizer.json nor vocab.json + merges.txt; "
                               "download the tokenizer files of the model too.") from None
    merges = [line for line in lines if line and not line.startswith("#version")]
    config = tokenizer_dir / "tokenizer_config.json"
    decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) if config.is_file() else {}
    added = {int(i): (e["content"], bool(e.get("special"))) for i, e in decoder.items()}
    return vocab, merges, added


def _spm_vocab(tokenizer_dir: Path, n_rows: int) -> dict:
    """SentencePiece (Yi): pieces, scores and types straight from tokenizer.model's proto
    (its piece types NORMAL..BYTE are GGUF's token types, same numbers); added tokens
    of tokenizer_config.json override, as convert_hf_to_gguf does."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    model_file = tokenizer_dir / "tokenizer.model"
    if not model_file.is_file():   # transformers 5 saves only tokenizer.json (no piece scores in it)
        raise ModelFormatError(f"{tokenizer_dir} has no tokenizer.model, which a SentencePiece model's GGUF is made "
                               "from (transformers 5 does not save it): copy tokenizer.model from the original "
                               "model's folder into it and convert again.")
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    by_id = {i: (p.piece, TokenType(p.type)) for i, p in enumerate(proto.pieces)}
    scores = {i: p.score for i, p in enumerate(proto.pieces)}
    config = tokenizer_dir / "tokenizer_config.json"
    decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) if config.is_file() else {}
    for i, entry in decoder.items():
        kind = TokenType.CONTROL if entry.get("special") else TokenType.USER_DEFINED
        by_id[int(i)] = (entry["content"], kind)
        scores.setdefault(int(i), -1000.0)
    tokens, types = _fill_rows(by_id, n_rows)
    return {"tokens": tokens, "types": types,
            "scores": [scores.get(i, -1000.0) for i in range(n_rows)],
            "add_space_prefix": transformers_adds_space_prefix(tokenizer_dir)}


def transformers_adds_space_prefix(tokenizer_dir: Path) -> bool:
    """Whether transformers' tokenizer for this folder (AutoTokenizer: what the torch
    reference runs and what the ONNX export saves as tokenizer.json) puts "▁" before a
    text's first word. llama.cpp's add_space_prefix must say the same, and it is not
    always tokenizer.model's add_dummy_prefix: with no tokenizer.json, transformers
    converts a Yi-style model (add_dummy_prefix false) with a "▁" prefix unless
    tokenizer_config.json says add_prefix_space false (measured: one prompt token more)."""
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=True).backend_tokenizer
    text = backend.normalizer.normalize_str("a") if backend.normalizer is not None else "a"
    if backend.pre_tokenizer is not None:
        text = "".join(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return text.startswith("\u2581")


def _fill_rows(by_id: dict, n_rows: int) -> tuple[list, list]:
    if by_id and max(by_id) >= n_rows:
        raise ModelFormatError(f"The tokenizer has token id {max(by_id)} but the model only {n_rows} "
                               "embedding rows; the tokenizer files belong to another model.")
    tokens = [by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(n_rows)]
    return [t for t, _ in tokens], [int(k) for _, k in tokens]


READERS_BY_KIND = {"bpe": _bpe_vocab, "spm": _spm_vocab}   # TextArch.vocab -> reader
VOCAB_READERS = {a.name: READERS_BY_KIND[a.vocab] for a in TEXT_ARCHS.values()}   # TextConfig.arch -> reader


def add_tokenizer(w: GGUFWriter, ckpt) -> None:
    text = ckpt.text
    arch = TEXT_ARCHS[text.arch]
    vocab = VOCAB_READERS[text.arch](Path(ckpt.tokenizer_dir), text.vocab_size)
    w.add_tokenizer_model(arch.gguf_tokenizer)
    w.add_tokenizer_pre(arch.gguf_pre)
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    if "add_space_prefix" in vocab:
        w.add_add_space_prefix(vocab["add_space_prefix"])
    special = {w.add_bos_token_id: text.bos_token_id, w.add_eos_token_id: text.eos_token_id,
               w.add_pad_token_id: text.pad_token_id}
    for add, token_id in special.items():
        if token_id is not None:
            add(token_id)
    w.add_add_bos_token(False)   # upstream adds no BOS
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template())


def write_text_gguf(ckpt, path: Path, qtype, file_type: int, meta) -> Path:
    """Write the text model in one ggml type (F32/F16/BF16/Q8_0; vectors stay F32)."""
    arch = MODEL_ARCH_NAMES[TEXT_ARCH[ckpt.text.arch]]

    def metadata(w: GGUFWriter) -> None:
        add_general(w, meta)   # general.name, basename, size_label, license, base_model.*
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hparams(w, ckpt.text)
        add_tokenizer(w, ckpt)

    return write_streaming_gguf(path, arch, metadata, text_plan(ckpt, qtype), text_arrays(ckpt),
                                desc=Path(path).name)
