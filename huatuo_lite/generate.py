"""The generation loop shared by every backend.

image sources + question (+ history) -> image/load.py + prompt.py -> engine.encode_images
-> engine.prefill -> Sampler / engine.step ... -> streamed text and an Answer.
"""
from __future__ import annotations

import codecs
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .image import load as image_mod
from . import prompt as prompt_mod
from .backends.base import Engine, ImageEmbeds, position_keys, segments_length
from .cache import FeatureCache, prefix_segments
from .families import family_of
from .sampler import Sampler
from .families.common import GenerationConfig
from .families.llava import GENERATION_DEFAULTS


@dataclass
class Answer:
    """One answer with the numbers a user asks for (`--json`)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str                    # "stop" (eos) or "length"
    timings: dict = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    token_ids: list = field(default_factory=list)

    def usage(self) -> dict:
        """OpenAI's `usage` object."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def llama_timings(self) -> dict:
        """llama-server's `timings` names. prompt_* is the prefill (image encoding apart,
        as image_ms); predicted_per_second is our decode rate (tokens after the first
        over the decode time, as decode_tokens_per_s)."""
        t = self.timings
        return {"prompt_n": self.prompt_tokens, "prompt_ms": t.get("prefill_s", 0.0) * 1000,
                "prompt_per_second": t.get("prefill_tokens_per_s", 0.0),
                "predicted_n": self.completion_tokens, "predicted_ms": t.get("decode_s", 0.0) * 1000,
                "predicted_per_second": t.get("decode_tokens_per_s", 0.0),
                "image_ms": t.get("image_encode_s", 0.0) * 1000}

    def to_dict(self) -> dict:
        """`ask --json`'s object: answer, its token ids, token counts, `usage`, and `timings`
        holding both our names (prefill_s, ...) and llama-server's (prompt_ms, ...). The ids let
        a script compare two answers exactly (a random-weight model's text may be empty)."""
        data = asdict(self)
        data["answer"] = data.pop("text")
        data["usage"] = self.usage()
        data["timings"] = {**self.timings, **self.llama_timings()}
        return data


def image_fit(engine: Engine):
    """How the engine's family brings an image to its input size (image/load.py FITS),
    with the model's own min/max pixels where it records them."""
    fit = image_mod.FITS[family_of(engine).NAME]
    pixels = getattr(engine, "image_pixels", None)
    return (lambda img: fit(img, *pixels)) if pixels else fit


def encode_images(engine: Engine, images: Sequence, cache: FeatureCache | None = None) -> list[ImageEmbeds]:
    """Load, preprocess (LLaVA: [3,336,336] each; Qwen2.5-VL: [3,h,w], h and w multiples of 28)
    and encode ([T, H] each: 576 rows, or (h/28)*(w/28)) the images; images already in
    `cache` (same preprocessed pixels) are not encoded again."""
    if not images:
        return []
    return encode_pixels(engine, image_mod.load_request(images, image_fit(engine)), cache)


def encode_pixels(engine: Engine, pixels: Sequence, cache: FeatureCache | None = None) -> list[ImageEmbeds]:
    """Preprocessed images (load_request's) -> ImageEmbeds, through the feature cache."""
    if len(pixels) == 0:
        return []
    keys = [image_mod.image_digest(p) for p in pixels]
    found = {}
    for key in dict.fromkeys(keys):                       # unique, in order
        cached = cache.lookup(engine, key) if cache is not None else None
        if cached is not None:
            found[key] = cached
    todo = [key for key in dict.fromkeys(keys) if key not in found]
    if todo:
        batch = [pixels[keys.index(k)] for k in todo]
        same_size = len({p.shape for p in batch}) == 1
        features = engine.encode_images(np.stack(batch) if same_size else batch)
        for key, rows in zip(todo, features):
            found[key] = np.ascontiguousarray(rows, dtype=np.float32)
            if cache is not None:
                cache.store(engine, key, found[key])
    grid_of = family_of(engine).grid_of
    return [ImageEmbeds(found[k], key=k, grid=grid_of(p)) for k, p in zip(keys, pixels)]


class Generation:
    """Iterate to stream text pieces; `.answer` holds the result when done."""

    def __init__(self, engine: Engine, turns: list, image_embeds: list[ImageEmbeds],
                 config: GenerationConfig, encode_seconds: float = 0.0, cache: FeatureCache | None = None):
        self.engine, self.config, self.cache = engine, config, cache
        # Turns, not joined text: upstream tokenizes each turn's pieces on their own.
        self.facts = family_of(engine)
        self.segments = prompt_mod.build_segments(turns, engine.tokenize, image_embeds, self.facts.NAME)
        self.prompt_tokens = segments_length(self.segments)
        prompt_mod.check_fits(self.prompt_tokens, config.max_new_tokens, engine.n_ctx,
                              _per_image([len(e.features) for e in image_embeds]), self.facts.IMAGE_ADVICE)
        self.timings = {"image_encode_s": encode_seconds}
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sampler, pieces, finish = Sampler(self.config, self._penalised_prompt()), [], "length"
        start = time.perf_counter()
        logits = self._prefill()
        prefill_done = time.perf_counter()
        for index in range(self.config.max_new_tokens):
            token = sampler(logits)
            if token in self.engine.eos_token_ids:
                sampler.generated.pop()
                finish = "stop"
                break
            piece = decoder.decode(self.engine.token_bytes(token))
            if piece:
                pieces.append(piece)
                yield piece
            if index + 1 < self.config.max_new_tokens:
                logits = self.engine.step(token)
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            yield tail
        self._finish("".join(pieces), sampler.generated, finish, start, prefill_done)

    def _penalised_prompt(self) -> list:
        """The prompt ids the repetition penalty sees: none (LLaVA upstream passes embeddings),
        or all of them with the image pad id at image positions (HF generate on input_ids)."""
        if not self.facts.PENALIZE_PROMPT:
            return []
        pad = self.engine.tokenize(self.facts.IMAGE_PAD)
        return [k if isinstance(k, int) else pad[0] for k in position_keys(self.segments)]

    def _prefill(self) -> np.ndarray:
        """Prefill the prompt; with a disk cache, the prefix holding the images first:
        restored from disk when there, else computed and written. The engines feed each
        segment as its own batches and reuse only whole segments, so the restored prefix
        and the rest give the very numbers of one cold prefill (tests/test_prefix_cache.py)."""
        head = prefix_segments(self.segments)
        identity = self.cache.identity(self.engine) if self.cache is not None and head else None
        restored = False
        if identity is not None and self.engine.held_positions(head) < segments_length(head):
            restored = self.cache.restore_prefix(self.engine, head)
            if not restored:
                self.engine.prefill(head)
                self.cache.save_prefix(self.engine, head)
        self.timings["prefix_cache_hit"] = int(restored)
        return self.engine.prefill(self.segments)

    def _finish(self, text, tokens, finish, start, prefill_done):
        end = time.perf_counter()
        prefill_s, decode_s = prefill_done - start, end - prefill_done
        self.timings.update({
            "prefill_s": prefill_s,
            "prefill_tokens_per_s": self.prompt_tokens / prefill_s if prefill_s else 0.0,
            "time_to_first_token_s": self.timings["image_encode_s"] + prefill_s,
            "decode_s": decode_s,
            "decode_tokens_per_s": max(len(tokens) - 1, 0) / decode_s if decode_s else 0.0,
        })
        # Upstream: batch_decode(skip_special_tokens=True)[0].strip()
        self.answer = Answer(text.strip(), self.prompt_tokens, len(tokens), finish,
                             self.timings, peak_rss_mb(), list(tokens))


def run(engine: Engine, images: Sequence, question: str, history: Sequence = (),
        config: GenerationConfig | None = None, history_images: Sequence = (),
        cache: FeatureCache | None = None) -> Generation:
    """Prepare one answer: `for piece in run(...)` streams it.

    `history` holds earlier prompt.Turn objects (with answers); `history_images`
    the images of those turns, in order (upstream splices every image of the
    conversation at its own placeholder)."""
    turns = list(history) + [prompt_mod.Turn(question=question, n_images=len(images))]
    return run_turns(engine, turns, list(history_images) + list(images), config, cache)


def run_turns(engine: Engine, turns: Sequence, images: Sequence,
              config: GenerationConfig | None = None, cache: FeatureCache | None = None) -> Generation:
    """Prepare the answer to the last (open) turn of a conversation."""
    facts = family_of(engine)
    prompt_mod.validate(turns, facts.NAME)
    config = config or GenerationConfig()
    start = time.perf_counter()
    pixels = image_mod.load_request(images, image_fit(engine)) if images else []   # budgets checked first
    # The prompt's length is known from the pixels' sizes: refuse one that cannot fit before the
    # (costly: 85 s for a 3000x3000 Qwen2.5-VL image on two cores) encoding, not after it.
    per_image = [facts.image_tokens(p) for p in pixels]
    text = [t for t in prompt_mod.LAYOUTS[facts.NAME](list(turns), engine.tokenize) if t != prompt_mod.IMAGE_SLOT]
    prompt_mod.check_fits(len(text) + sum(per_image), config.max_new_tokens, engine.n_ctx, _per_image(per_image),
                          facts.IMAGE_ADVICE)
    embeds = encode_pixels(engine, pixels, cache)
    return Generation(engine, list(turns), embeds, config, time.perf_counter() - start, cache=cache)


def _per_image(counts: list) -> str | None:
    """How the images' tokens read in the prompt-length sentence: '576 per image', or (sizes
    that differ, Qwen2.5-VL) '1255 for the images'."""
    if not counts:
        return None
    return f"{counts[0]} per image" if len(set(counts)) == 1 else f"{sum(counts)} for the images"


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def generation_config(defaults: GenerationConfig | None = None, **options) -> GenerationConfig:
    """The model's defaults (`families.generation_defaults(engine)`; upstream LLaVA's when
    not given) with the given (non-None) options replaced."""
    return (defaults or GENERATION_DEFAULTS).with_overrides(**options)
