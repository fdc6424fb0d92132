"""Checkpoints whose tokenizer and config files transformers 5 wrote convert and load under
transformers 4.57 (issue #18). The transformers-5 folders are made WITHOUT transformers 5:
`as_transformers5` rewrites a tiny checkpoint's files the way transformers 5.25 saves them
(measured: AutoTokenizer/AutoConfig.save_pretrained of the tiny 7B, 7B-hf and 34B; see
convert/checkpoint/tokenizer.py for the differences)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from support.engines import skip_without

skip_without("torch", "transformers", "gguf")

SLOW_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json")
DROPPED_KEYS = ("added_tokens_decoder", "additional_special_tokens", "add_bos_token", "add_eos_token", "legacy")
TEXTS = ["Hello", " Hello", "  lead", "a\nb", "\n\nx", "<|user|>\n<image>\nWhat is this?\n<|assistant|>\n",
         "你好，世界", "x<|endoftext|>y", "<unk>", "tab\there", "end ", "ümlaut café", "<|im_start|>q<|im_end|>"]


def _rewrite(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def _tokenizer_config(cfg: dict, tokenizer_class: str | None) -> None:
    extra = cfg.get("additional_special_tokens")
    for key in DROPPED_KEYS:
        cfg.pop(key, None)
    if extra:
        cfg["extra_special_tokens"] = extra          # a list in transformers 5, a dict in 4.x
    cfg.update(backend="tokenizers", is_local=True, local_files_only=False)
    if tokenizer_class:
        cfg["tokenizer_class"] = tokenizer_class


def _tokenizer_json(data: dict, specials: list) -> None:
    if data["pre_tokenizer"] and "ByteLevel" in json.dumps(data["pre_tokenizer"]):   # Qwen2 byte-level BPE
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            data["model"][key] = data["model"][key] or ""
        return
    # SentencePiece (Yi) rebuilt by transformers 5's converter: Metaspace, no normalizer, the special tokens only
    vocab = data["model"]["vocab"]
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": False}
    data["post_processor"] = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {}}
    data["model"]["unk_token"] = None
    data["added_tokens"] = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t in sorted(specials, key=vocab.get)]


def _rope_parameters(cfg: dict) -> None:
    text = cfg.get("text_config", cfg)
    text["rope_parameters"] = {"rope_theta": text.pop("rope_theta"), "rope_type": "default"}
    cfg["dtype"] = cfg.pop("torch_dtype")


def as_transformers5(src: Path, dst: Path, tokenizer_class: str | None = None) -> Path:
    """A copy of `src` with tokenizer and config files as transformers 5 saves them."""
    shutil.copytree(src, dst)
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = [tok_cfg[k] for k in ("unk_token", "bos_token", "eos_token") if tok_cfg.get(k)]
    _rewrite(dst / "tokenizer_config.json", lambda c: _tokenizer_config(c, tokenizer_class))
    _rewrite(dst / "tokenizer.json", lambda d: _tokenizer_json(d, list(dict.fromkeys(specials))))
    _rewrite(dst / "config.json", _rope_parameters)
    for name in SLOW_FILES:
        (dst / name).unlink(missing_ok=True)
    return dst


def _tf5(src: Path, tmp_path: Path, **options) -> Path:
    return as_transformers5(src, tmp_path / "tf5" / "model", **options)   # same folder name as the source


def _ids(tokenizer) -> list:
    return [tokenizer(text, add_special_tokens=False).input_ids for text in TEXTS]


def test_the_rewrite_looks_like_transformers5(tiny_7b, tmp_path):
    """Guards the helper: the transformers-5 markers are there and the slow files are gone."""
    from huatuo_lite.convert.checkpoint.tokenizer import tokenizer_config, written_by_transformers5

    folder = _tf5(tiny_7b, tmp_path)
    config = tokenizer_config(folder)
    assert written_by_transformers5(config) and not written_by_transformers5(tokenizer_config(tiny_7b))
    assert isinstance(config["extra_special_tokens"], list) and "added_tokens_decoder" not in config
    assert not any((folder / name).exists() for name in SLOW_FILES)


def test_qwen2_gguf_bytes_equal_the_4x_folders(tiny_7b, tmp_path):
    """convert gguf reads tokenizer.json and rope_parameters: the same text GGUF, byte for byte."""
    from huatuo_lite.convert.gguf.export import export_gguf

    old = export_gguf(tiny_7b, tmp_path / "gguf-4x", quant="F32", vision_onnx=False, threads=1)
    new = export_gguf(_tf5(tiny_7b, tmp_path), tmp_path / "gguf-5", quant="F32", vision_onnx=False, threads=1)
    assert old.name == new.name and old.read_bytes() == new.read_bytes()


def test_yi_gguf_says_what_to_copy(tiny_34b, tmp_path):
    """A SentencePiece GGUF needs tokenizer.model's scores, which transformers 5 does not save."""
    from huatuo_lite.convert.gguf.export import export_gguf
    from huatuo_lite.errors import HuatuoError

    folder = _tf5(tiny_34b, tmp_path)
    out = tmp_path / "gguf"
    with pytest.raises(HuatuoError) as caught:
        export_gguf(folder, out, quant="F32", vision_onnx=False, threads=1)
    message = str(caught.value)
    print(message)
    assert str(folder) in message and "tokenizer.model" in message and message.count(". ") == 0
    assert not list(out.glob("*.gguf"))


@pytest.mark.parametrize("variant, tokenizer_class", [("7b", None), ("34b", None), ("7b-hf", "TokenizersBackend")])
def test_reference_tokenizer_gives_the_4x_ids(variant, tokenizer_class, tiny_7b, tiny_34b, tiny_7b_hf, tmp_path):
    """The torch reference's (and training's) tokenizer: the same ids and token bytes as the 4.x
    folder's, for the Qwen2 and the Yi vocabulary, and for transformers 5's generic class name."""
    from huatuo_lite.convert.checkpoint.tokenizer import open_tokenizer
    from huatuo_lite.convert.reference.engine import token_bytes_table

    src = {"7b": tiny_7b, "34b": tiny_34b, "7b-hf": tiny_7b_hf}[variant]
    old, new = open_tokenizer(src), open_tokenizer(_tf5(src, tmp_path, tokenizer_class=tokenizer_class))
    assert _ids(new) == _ids(old) and len(set(map(tuple, _ids(old)))) == len(TEXTS)
    rows = len(old) + 8
    assert token_bytes_table(new, rows) == token_bytes_table(old, rows)
    assert new.all_special_ids == old.all_special_ids


def test_reference_engine_opens_a_transformers5_folder(tiny_7b, torch_7b, tmp_path):
    """The whole engine: same prompt ids, same eos, same rope base as the 4.x folder's."""
    from huatuo_lite.backends import load_backend

    engine = load_backend("torch").open_engine(_tf5(tiny_7b, tmp_path), threads=1)
    try:
        prompt = "<|user|>\nWhat is shown?\n<|assistant|>\n"
        assert engine.tokenize(prompt) == torch_7b.tokenize(prompt)
        assert engine.eos_token_ids == torch_7b.eos_token_ids
        assert engine.checkpoint.text == torch_7b.checkpoint.text
    finally:
        engine.close()


@pytest.mark.parametrize("variant", ["7b", "7b-hf"])
def test_rope_theta_comes_from_rope_parameters(variant, tiny_7b, tiny_7b_hf, tmp_path):
    """transformers 5 moves rope_theta into rope_parameters; the class default (10000) would be wrong."""
    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.families.text import TEXT_ARCHS

    src = {"7b": tiny_7b, "7b-hf": tiny_7b_hf}[variant]
    folder = _tf5(src, tmp_path)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert "rope_theta" not in config.get("text_config", config)
    text = open_checkpoint(folder).text
    assert text.rope_theta == open_checkpoint(src).text.rope_theta
    assert text.rope_theta != TEXT_ARCHS[text.arch].missing_key_defaults["rope_theta"]
