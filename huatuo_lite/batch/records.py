"""Dataset records -> the questions `huatuo-lite batch` asks, one per record.

Three record shapes, recognised per record by their keys (first match wins):

- PubMedVision / LLaVA (`conversations`): the first human turn is the
  question (any `<image>` placeholders removed: prompt.py adds its own); the
  first gpt turn is kept as `reference`.
- upstream eval (`question` + `options`): the eval prompt (question, lettered
  options, family.EVAL_ANSWER_SUFFIX) exactly as `huatuo-lite eval` builds it,
  so batch and eval answer the same text; the answer's letter is kept.
- a plain `question` (open questions): asked as written.

Images are paths relative to the JSON's folder (absolute paths stay). They
are not opened here: the workers read them, wherever they run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..jsonrecords import read_record_list
from ..errors import HuatuoError
from ..eval.run import build_prompt, parse_options
from ..families.llava import EVAL_OPTION_LETTERS, IMAGE_PLACEHOLDER

COPIED_FIELDS = ("id", "dataset", "subset", "modality", "body_part")   # carried into each result row


@dataclass(frozen=True)
class BatchItem:
    """One record's question; `extra` goes into its result row."""

    index: int               # position in the JSON list: the record's id in the results
    key: str                 # fingerprint: a result row belongs to this record
    kind: str                # "eval", "conversation" or "question"
    prompt: str
    images: tuple            # absolute paths
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "BatchItem":
        data = json.loads(text)
        return cls(**{**data, "images": tuple(data["images"])})


# -------------------------------------------------------------- formats ----
def eval_question(record: dict, where: str) -> tuple[str, dict]:
    try:
        options = parse_options(record, where)
    except (RecursionError, MemoryError, TypeError):     # a Python-literal 'options' string gone wrong
        raise HuatuoError(f"{where}: 'options' is not a list of texts; fix the record.") from None
    if not isinstance(record.get("question", ""), str):
        raise HuatuoError(f"{where}: 'question' must be a text; fix the record.")
    answer = str(record.get("answer", ""))
    letter = EVAL_OPTION_LETTERS[options.index(answer)] if answer in options else None
    return build_prompt(str(record.get("question", "")), options), {"answer": letter}


def conversation_question(record: dict, where: str) -> tuple[str, dict]:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise HuatuoError(f"{where}: 'conversations' must be a list of turns; fix the record.")
    human = [t for t in turns if isinstance(t, dict) and t.get("from") == "human"]
    if not human:
        raise HuatuoError(f"{where}: its conversations have no human turn to ask; fix the record.")
    question = str(human[0].get("value", "")).replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
    replies = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
    return question.strip(), ({"reference": replies[0]} if replies else {})


def plain_question(record: dict, where: str) -> tuple[str, dict]:
    if not isinstance(record["question"], str):
        raise HuatuoError(f"{where}: 'question' must be a text; fix the record.")
    return record["question"], {}


def record_images(record: dict, where: str) -> list[str]:
    """The record's image paths (`image` or `images`: one path or a list of them)."""
    images = record.get("image") or record.get("images") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p and "\0" not in p for p in images):
        raise HuatuoError(f"{where}: 'image' must be a path or a list of paths; fix the record.")
    return images


# record key that marks the shape -> (kind, builder); dict order is the match order
RECORD_SHAPES = {"conversations": ("conversation", conversation_question),
                 "options": ("eval", eval_question),
                 "question": ("question", plain_question)}


def record_item(record: dict, index: int, root: Path, where: str) -> BatchItem:
    shape = next((k for k in RECORD_SHAPES if record.get(k)), None)
    if shape is None:
        raise HuatuoError(f"{where} has no question: give eval records (question, options) or "
                          "PubMedVision records (conversations).")
    kind, build = RECORD_SHAPES[shape]
    prompt, extra = build(record, where)
    images = record_images(record, where)
    key = hashlib.sha1(json.dumps([prompt, images], ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    copied = {k: record[k] for k in COPIED_FIELDS if k in record}
    return BatchItem(index, key, kind, prompt, tuple(str(root / p) for p in images), {**copied, **extra})


def load_batch_items(path, limit: int | None = None) -> list[BatchItem]:
    """Every record of a dataset JSON (a list) as a BatchItem, the first `limit` only if given."""
    path = Path(path)
    records = read_record_list(path, "dataset file", "an eval or PubMedVision file")
    records = records[:limit] if limit else records
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise HuatuoError(f"{path} record {bad} is not an object; fix the file.")
    root = path.resolve().parent
    return [record_item(r, i, root, f"{path} record {i}") for i, r in enumerate(records)]
