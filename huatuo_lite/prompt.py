"""Conversation -> prompt text -> token ids with image slots, exactly as upstream.

Upstream (HuatuoGPT-Vision cli.py, `preprocess_huatuo` + `tokenizer_image_token`)
renders and tokenizes a conversation in independent pieces:

    earlier turn:  "<|user|>\\n{q}\\n"               split at <image>, each chunk tokenized
                   "<|assistant|>\\n{a} \\n"          tokenized whole (never split)
    last turn:     "<|user|>\\n{q}\\n<|assistant|>\\n" split at <image>, each chunk tokenized

where {q} is `("<image>\\n" * n_images + question).strip()`. Every chunk is
tokenized without special tokens, and each `<image>` becomes one slot
(IMAGE_SLOT, upstream's IMAGE_TOKEN_INDEX) that the image's 576 features replace.
Tokenizing piece by piece matters: a SentencePiece tokenizer may merge across
a piece boundary when given the joined text. Use `prompt_token_layout(turns, ...)`
or `build_segments(turns, ...)` with the turns to get upstream's exact ids.

Two inputs upstream silently rewrites are handled here as follows: a literal
"<image>" in a question is refused (upstream deletes it), and "<s>"/"</s>" are
deleted as upstream's `input_moderation` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np

from .families import llava as family
from .families import family_module
from .backends.base import ImageEmbeds, Segment
from .errors import PromptError

IMAGE_SLOT = -200          # upstream llava.constants.IMAGE_TOKEN_INDEX
DELETED_MARKERS = ("<s>", "</s>")   # removed from questions by upstream's input_moderation

Tokenize = Callable[[str], list]   # text -> token ids, no special tokens added


@dataclass
class Turn:
    """One user turn: its question, how many images it adds, and (for earlier turns) the answer."""

    question: str
    n_images: int = 0
    answer: str | None = None
    # a system prompt, read on the first turn only, by a family whose template has one
    # (Qwen2.5-VL: replaces its default; LLaVA upstream has none and ignores it)
    system: str | None = None


@dataclass(frozen=True)
class Piece:
    """A span upstream tokenizes on its own; user spans are split at <image>, answers are not."""

    text: str
    has_image_slots: bool


# ---------------------------------------------------------- validation ----
def validate(turns: Sequence[Turn], family_name: str | None = None) -> None:
    """Refuse a conversation upstream could not run sensibly, with one sentence."""
    facts = family_module(family_name)
    if not turns:
        raise PromptError("There is no question to answer: ask a question.")
    for index, turn in enumerate(turns):
        _check_turn(turn, is_last=index == len(turns) - 1, facts=facts)
    total = count_images(turns)
    if total > facts.MAX_IMAGES:
        raise PromptError(
            f"The conversation has {total} images but the model takes at most "
            f"{facts.MAX_IMAGES}: use fewer images or start a new conversation.")


def _check_turn(turn: Turn, is_last: bool, facts=family) -> None:
    if not isinstance(turn.question, str) or not moderate(turn.question).strip():
        raise PromptError("The question is empty: type a question.")
    if not is_utf8_text(turn.question):
        raise PromptError("The question is not valid UTF-8 text (it holds undecodable bytes): "
                          "type it again or set the terminal to UTF-8.")
    marker = facts.reserved_in(turn.question) or (facts.reserved_in(turn.system) if turn.system else None)
    if marker is not None:
        raise PromptError(
            f"The question contains the text {marker!r}, which {facts.RESERVED_MEANING}: "
            "remove it and pass the images separately.")
    if not isinstance(turn.n_images, int) or turn.n_images < 0:
        raise PromptError(f"A turn cannot have {turn.n_images!r} images: use a count of 0 or more.")
    if is_last and turn.answer is not None:
        raise PromptError("The last turn already has an answer: add a new question to answer.")
    if not is_last and turn.answer is None:
        raise PromptError("An earlier turn has no answer: only the last question may be open.")


def is_utf8_text(text: str) -> bool:
    """False for a str holding lone surrogates: bytes on argv that were not UTF-8
    arrive as U+DC80..U+DCFF (surrogateescape) and no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def count_images(turns: Sequence[Turn]) -> int:
    return sum(turn.n_images for turn in turns)


# ------------------------------------------------------------ rendering ----
def moderate(question: str) -> str:
    """Upstream's input_moderation, less "<image>" (which validate refuses)."""
    for marker in DELETED_MARKERS:
        question = question.replace(marker, "")
    return question


def user_text(turn: Turn) -> str:
    """The user's part of a turn: one "<image>\\n" per image in front, stripped as upstream."""
    return (family.IMAGE_LINE * turn.n_images + moderate(turn.question)).strip()


def render_pieces(turns: Sequence[Turn]) -> list[Piece]:
    """The conversation as upstream's independently tokenized pieces (validated)."""
    validate(turns)
    pieces = []
    for turn in turns[:-1]:
        pieces.append(Piece(f"{family.USER_TAG}{user_text(turn)}\n", True))
        pieces.append(Piece(f"{family.ASSISTANT_TAG}{turn.answer}{family.ANSWER_SUFFIX}", False))
    last = f"{family.USER_TAG}{user_text(turns[-1])}\n{family.ASSISTANT_TAG}"
    pieces.append(Piece(last, True))
    return pieces


def render(turns: Sequence[Turn]) -> str:
    """The full prompt text, the last turn left open for the answer."""
    return "".join(piece.text for piece in render_pieces(turns))


def split_at_images(text: str) -> list[str]:
    """The text between <image> placeholders: n_images + 1 pieces (some may be empty)."""
    return text.split(family.IMAGE_PLACEHOLDER)


# ----------------------------------------------------------- token ids ----
def text_token_layout(text: str, tokenize: Tokenize, bos_token_id: int | None = None) -> list[int]:
    """Upstream's tokenizer_image_token on one piece: ids with IMAGE_SLOT per <image>.

    If the first chunk starts with the BOS id, upstream keeps one BOS and drops
    the first id of every chunk (a tokenizer that adds BOS adds it to each);
    with no special tokens added this never triggers, but it is kept faithful.
    """
    chunks = [tokenize(chunk) if chunk else [] for chunk in split_at_images(text)]
    ids: list[int] = []
    offset = 0
    if chunks[0] and bos_token_id is not None and chunks[0][0] == bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for index, chunk in enumerate(chunks):
        if index:
            ids.append(IMAGE_SLOT)
        ids.extend(list(chunk)[offset:])
    return ids


def prompt_token_layout(prompt: Union[Sequence[Turn], str], tokenize: Tokenize,
                        bos_token_id: int | None = None) -> list[int]:
    """Token ids of a whole prompt, IMAGE_SLOT where each image goes.

    Given turns, each upstream piece is tokenized on its own (upstream-exact);
    given a string, it is treated as one user piece (exact for a single turn).
    """
    if isinstance(prompt, str):
        return text_token_layout(prompt, tokenize, bos_token_id)
    ids: list[int] = []
    for piece in render_pieces(prompt):
        if piece.has_image_slots:
            ids.extend(text_token_layout(piece.text, tokenize, bos_token_id))
        else:
            ids.extend(tokenize(piece.text))
    return ids


def chatml_token_layout(turns: Sequence[Turn], tokenize: Tokenize) -> list[int]:
    """Qwen2.5-VL: the chat template's text (families.qwen25vl.render), IMAGE_SLOT where each
    image's <|image_pad|> run goes. The pad sits between two special tokens, so tokenizing
    the text between pads equals HF tokenizing the whole expanded text."""
    from .families import qwen25vl

    validate(turns, qwen25vl.NAME)
    ids: list[int] = []
    for index, chunk in enumerate(qwen25vl.render(turns).split(qwen25vl.IMAGE_PAD)):
        if index:
            ids.append(IMAGE_SLOT)
        ids.extend(tokenize(chunk) if chunk else [])
    return ids


# family -> its prompt's token layout (IMAGE_SLOT per image)
LAYOUTS = {"llava": prompt_token_layout, "qwen25vl": chatml_token_layout}


def build_segments(prompt: Union[Sequence[Turn], str], tokenize: Tokenize,
                   image_features: Sequence, family_name: str | None = None) -> list[Segment]:
    """Prompt -> [token ids, ImageEmbeds, token ids, ...] for Engine.prefill.

    image_features: one ImageEmbeds (or float32 [T, H] array) per image, in
    the order their placeholders appear. Empty text runs are left out.
    """
    layout = LAYOUTS[family_name or family.NAME](prompt, tokenize)
    n_slots = layout.count(IMAGE_SLOT)
    if n_slots != len(image_features):
        raise PromptError(
            f"The prompt has {n_slots} image placeholders but {len(image_features)} images "
            "were given: pass one image per placeholder.")
    features = iter(image_features)
    segments: list[Segment] = []
    run: list[int] = []
    for token in layout:
        if token != IMAGE_SLOT:
            run.append(token)
            continue
        if run:
            segments.append(run)
            run = []
        segments.append(_as_embeds(next(features)))
    if run:
        segments.append(run)
    return segments


def _as_embeds(features) -> ImageEmbeds:
    if isinstance(features, ImageEmbeds):
        return features
    return ImageEmbeds(np.ascontiguousarray(features, dtype=np.float32))


# -------------------------------------------------------------- context ----
def check_fits(n_prompt_tokens: int, max_new_tokens: int, n_ctx: int, per_image: str | None = None,
               fewer_images: str = "fewer images") -> None:
    """Refuse a prompt that leaves no room for max_new_tokens in the context (fewer_images: the
    family's advice, IMAGE_ADVICE)."""
    overflow = n_prompt_tokens + max_new_tokens - n_ctx
    if overflow <= 0:
        return
    per_image = per_image or f"{family.IMAGE_TOKENS} per image"
    if n_prompt_tokens >= n_ctx:
        raise PromptError(
            f"The prompt takes {n_prompt_tokens} tokens ({per_image}), "
            f"{n_prompt_tokens - n_ctx + 1} too many for the model's context of {n_ctx} to hold "
            f"even one answer token: use {fewer_images}, a shorter question or a shorter "
            "conversation, or a larger --n-ctx (GGUF).")
    raise PromptError(
        f"The prompt ({n_prompt_tokens} tokens, {per_image}) plus --max-tokens {max_new_tokens} "
        f"overflows the model's context of {n_ctx} by {overflow} tokens: use --max-tokens "
        f"{n_ctx - n_prompt_tokens} or less, {fewer_images}, a shorter question, or a larger --n-ctx (GGUF).")
