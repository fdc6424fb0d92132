"""PubMedVision-format records -> training examples with the inference token layout.

A record (PubMedVision / LLaVA JSON):

    {"image": ["imgs/a.png", ...], "conversations": [{"from": "human", "value": "..."},
     {"from": "gpt", "value": "..."}, ...], "modality": ..., "body_part": ...}

The text holds no `<image>`: one placeholder per image goes in front of the first
human turn, the upstream way (prompt.user_text puts "<image>\\n" lines there).
LLaVA-style data that already holds `<image>` is accepted when it holds exactly
one per image; the placeholders are moved to that same place.

One example per assistant reply i, holding exactly the token ids inference runs
when it answers question i with replies 1..i-1 as history (prompt.prompt_token_layout,
piece by piece, IMAGE_SLOT per image), followed by the reply's ids and the eos id:

    input_ids: [prompt ids (IMAGE_SLOT per image)] [reply ids] [eos]
    labels:    [-100 ...                         ] [reply ids] [eos]

Why eos and not the history suffix " \\n": inference stops at eos, and a reply
reappears in later prompts as "{a} \\n" (prompt.py renders that); so the model
learns to end each reply with eos while every prompt it sees is the inference one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from huatuo_lite.families import llava as family
from huatuo_lite.errors import HuatuoError
from huatuo_lite.prompt import IMAGE_SLOT, Turn, prompt_token_layout

IGNORE = -100                      # label of a position that is not trained
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
BAD_DATA_CHOICES = ("refuse", "skip")


class DataError(HuatuoError):
    """A training record or file that cannot be used."""


@dataclass(frozen=True)
class DataProblem:
    index: int                     # position of the record in the data file (0-based)
    reason: str

    def sentence(self) -> str:
        return f"record {self.index}: {self.reason}"


@dataclass
class Example:
    """One reply to learn, with everything needed to run it."""

    record_index: int
    reply_index: int
    input_ids: list                # token ids, IMAGE_SLOT where each image's features go
    labels: list                   # IGNORE except the reply ids and the eos after it
    images: list = field(default_factory=list)   # image paths, in placeholder order

    def n_positions(self, image_tokens: int) -> int:
        """Sequence length once every IMAGE_SLOT becomes image_tokens feature rows."""
        slots = self.input_ids.count(IMAGE_SLOT)
        return len(self.input_ids) - slots + slots * image_tokens


# ------------------------------------------------------------------ reading ----
def read_records(path) -> list:
    """A JSON list of records, or JSON Lines (one record per line)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"Cannot read the training data {path} ({err.strerror}); check the path.") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = _read_json_lines(text, path)
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON list of records (or one JSON record per line).")
    return data


def _read_json_lines(text: str, path: Path) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            raise DataError(f"{path} is neither JSON nor JSON Lines (line {number}: {err}); fix the file.") from None
    return records


# --------------------------------------------------------------- validation ----
def _image_list(record: dict) -> list:
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if images is None:
        return []
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise ValueError("'image' must be a list of image paths")
    return images


def _dialogue(record: dict) -> list:
    """[(question, answer), ...] from alternating human/gpt turns."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("it has no conversations")
    roles = [ROLES.get(t.get("from")) if isinstance(t, dict) else None for t in turns]
    texts = [t.get("value") if isinstance(t, dict) else None for t in turns]
    expected = ["human", "gpt"] * (len(turns) // 2 + 1)
    if len(turns) % 2 or roles != expected[:len(turns)]:
        raise ValueError("its conversations must alternate human, gpt, human, gpt... and end with gpt")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("it has an empty or non-text turn")
    return [(texts[i], texts[i + 1].strip()) for i in range(0, len(texts), 2)]


def _without_placeholders(pairs: list, n_images: int) -> list:
    """Remove LLaVA-style "<image>" marks (one per image) so prompt.py inserts them."""
    marks = sum(q.count(family.IMAGE_PLACEHOLDER) + a.count(family.IMAGE_PLACEHOLDER) for q, a in pairs)
    if marks and marks != n_images:
        raise ValueError(f"it has {n_images} images but {marks} {family.IMAGE_PLACEHOLDER} placeholders; "
                         "give one image per placeholder, or no placeholders")
    if any(family.IMAGE_PLACEHOLDER in a for _, a in pairs):
        raise ValueError(f"a reply contains {family.IMAGE_PLACEHOLDER}")
    strip = lambda q: q.replace(family.IMAGE_LINE, "").replace(family.IMAGE_PLACEHOLDER, "").strip()
    cleaned = [(strip(q), a) for q, a in pairs]
    if not all(q for q, _ in cleaned):
        raise ValueError("a question is empty once its placeholders are removed")
    return cleaned


def _resolve_images(images: list, image_root: Path) -> list:
    paths = [(image_root / name).expanduser() for name in images]
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise ValueError(f"its image {missing} does not exist")
    return paths


def parse_record(record, image_root: Path) -> tuple:
    """(pairs [(question, reply)], image paths); ValueError with the reason if unusable."""
    if not isinstance(record, dict):
        raise ValueError("it is not a JSON object")
    images = _image_list(record)
    if len(images) > family.MAX_IMAGES:
        raise ValueError(f"it has {len(images)} images but the model takes at most {family.MAX_IMAGES}")
    pairs = _without_placeholders(_dialogue(record), len(images))
    return pairs, _resolve_images(images, image_root)


# ---------------------------------------------------------------- examples ----
def record_examples(index: int, pairs: list, images: list, tokenize: Callable,
                    eos_id: int) -> list:
    """One Example per reply: the inference prompt for that question, then reply + eos."""
    examples = []
    for i, (_, reply) in enumerate(pairs):
        turns = [Turn(q, len(images) if j == 0 else 0, a) for j, (q, a) in enumerate(pairs[:i])]
        turns.append(Turn(pairs[i][0], len(images) if i == 0 else 0))
        prompt = prompt_token_layout(turns, tokenize)
        target = list(tokenize(reply)) + [eos_id]
        examples.append(Example(index, i, prompt + target, [IGNORE] * len(prompt) + target, list(images)))
    return examples


def build_examples(records: Sequence, tokenize: Callable, eos_id: int, image_root, *,
                   max_length: int = family.CONTEXT_LENGTH, image_tokens: int = family.IMAGE_TOKENS,
                   on_bad: str = "refuse", source: str = "the data", make_examples: Callable | None = None) -> tuple:
    """(examples, problems). on_bad="refuse" raises DataError at the first bad record
    (with its index); "skip" leaves bad records out and lists them in problems.
    make_examples(index, pairs, images) -> [Example]: another family's token layout
    (default: record_examples with tokenize and eos_id)."""
    if on_bad not in BAD_DATA_CHOICES:
        raise DataError(f"Unknown bad-data choice {on_bad!r}: use one of {', '.join(BAD_DATA_CHOICES)}.")
    examples, problems = [], []
    for index, record in enumerate(records):
        try:
            pairs, images = parse_record(record, Path(image_root))
            found = (make_examples(index, pairs, images) if make_examples
                     else record_examples(index, pairs, images, tokenize, eos_id))
            longest = max(e.n_positions(image_tokens) for e in found)
            if longest > max_length:
                raise ValueError(f"it takes {longest} positions, more than the maximum length {max_length}")
        except (ValueError, HuatuoError) as err:
            problem = DataProblem(index, str(err).rstrip("."))
            if on_bad == "refuse":
                raise DataError(f"Record {index} of {source} cannot be used: {problem.reason}; fix it, or "
                                "skip such records (--bad-records skip).") from None
            problems.append(problem)
            continue
        examples.extend(found)
    if not examples:
        raise DataError(f"{source} holds no usable record ({len(problems)} skipped); check the file.")
    return examples, problems


def split_validation(examples: list, fraction: float, seed: int) -> tuple:
    """(train, validation), split by record so a conversation never lands in both."""
    import random

    if not 0.0 <= fraction < 1.0:
        raise DataError(f"The validation fraction must be in [0, 1), got {fraction}.")
    records = sorted({e.record_index for e in examples})
    n_val = round(len(records) * fraction)
    if fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= len(records) and fraction > 0:
        raise DataError(f"A validation split of {fraction} leaves no training record out of {len(records)}; "
                        "use a smaller --val-split.")
    held = set(random.Random(seed).sample(records, n_val))
    return ([e for e in examples if e.record_index not in held],
            [e for e in examples if e.record_index in held])
