"""transformers' tokenizer for a checkpoint folder, whichever transformers version wrote its files.

The torch reference and training tokenize through transformers (4.57). A folder whose
tokenizer files transformers 5 saved differs from a 4.x one (measured with 5.25):
- only tokenizer.json + tokenizer_config.json: no tokenizer.model, vocab.json, merges.txt,
  special_tokens_map.json;
- tokenizer_config.json has "backend": "tokenizers", `extra_special_tokens` as a LIST of
  token strings (4.x: a dict of named extras, and `additional_special_tokens` for the list),
  no `added_tokens_decoder`, and a `tokenizer_class` that may be tf5's generic
  "TokenizersBackend" (unknown to 4.x).
transformers 4.57's AutoTokenizer fails on such a folder ('list' object has no attribute
'keys'; "Either model_file or model_proto must be specified" for a SentencePiece model, whose
class rebuilds itself from tokenizer.model when add_prefix_space is set). For transformers 5,
"backend": "tokenizers" means tokenizer.json is the whole tokenizer, so it is read as such
(PreTrainedTokenizerFast) with the list passed as additional_special_tokens. Measured on the
tiny 7B, 7B-hf and 34B: the same ids and token bytes as the 4.x folders they were saved from
(tests/convert/test_transformers5_folders.py). 4.x folders keep AutoTokenizer, untouched.
"""
from __future__ import annotations

from pathlib import Path

from huatuo_lite.errors import ModelFormatError
from huatuo_lite.jsonrecords import read_json_object

TOKENIZER_CONFIG = "tokenizer_config.json"


def tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json as a dict ({} when there is none)."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    return read_json_object(path, "download the tokenizer files again", ModelFormatError)


def written_by_transformers5(config: dict) -> bool:
    """tokenizer_config.json in transformers 5's format (4.x never writes either key so)."""
    return config.get("backend") == "tokenizers" or isinstance(config.get("extra_special_tokens"), list)


def open_tokenizer(folder):
    """transformers' (fast) tokenizer for `folder`, a 4.x or a transformers-5 save."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging

    folder = Path(folder)
    config = tokenizer_config(folder)
    if not written_by_transformers5(config):
        return AutoTokenizer.from_pretrained(str(folder))
    if not (folder / "tokenizer.json").is_file():
        raise ModelFormatError(f"{folder}/{TOKENIZER_CONFIG} was written by transformers 5 but the folder has no "
                               "tokenizer.json; copy tokenizer.json from the model's original folder.")
    extra = config.get("extra_special_tokens") or []
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()   # "the tokenizer class you load ... is not the same type": on purpose
    try:
        return PreTrainedTokenizerFast.from_pretrained(
            str(folder), extra_special_tokens={},
            additional_special_tokens=list(extra) if isinstance(extra, list) else [])
    finally:
        logging.set_verbosity(verbosity)
