"""What every family shares: generation options and their rules, the limits on image
input, the variant record, the notices, upstream's evaluation protocol. A family's own
facts live in its module (llava.py, qwen25vl.py); these hold for all of them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from numbers import Integral, Real

from ..errors import HuatuoError

# ------------------------------------------------------------------ image ----
# OpenAI CLIP's normalisation, which both families' image processors use (pixels x/255 first)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE = 1.0 / 255.0

# ----------------------------------------------------------------- limits ----
# Limits on what image input may allocate (checked from headers, see image_limits.py).
# Pixels are counted as expand2square allocates them: max(width, height)^2.
MAX_IMAGE_PIXELS = 20000 * 20000  # one image; refuse decompression bombs above this
# One request's images in all (env HUATUO_LITE_MAX_REQUEST_PIXELS overrides): as much
# as one largest image. Images are decoded one at a time, so the peak memory is
# one image's (2.1 GB peak RSS for six 1-bit 19999^2 PNGs, demo model); the budget bounds the time.
MAX_REQUEST_PIXELS = MAX_IMAGE_PIXELS
MAX_IMAGE_FILE_BYTES = 1 << 30    # bytes read from one image file (an uncompressed 16-bit 20000^2 DICOM is 0.8 GB)


# ------------------------------------------------------------ generation ----
@dataclass(frozen=True)
class GenerationConfig:
    """Upstream's sampling defaults (HF generate with do_sample=True).

    HF applies, in order: repetition penalty (to tokens generated so far: upstream
    passes only inputs_embeds, so the prompt is not penalised), temperature,
    top-k (HF's default 50), top-p. temperature == 0 means greedy.
    """

    temperature: float = 0.2
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.2
    max_new_tokens: int = 512
    seed: int | None = None

    def __post_init__(self):
        # Every surface (CLI, Python API, chat, eval, batch, server) builds one of
        # these, so this is the one place options are checked.
        for option in fields(self):
            check_generation_option(option.name, getattr(self, option.name))

    def with_overrides(self, **values) -> "GenerationConfig":
        """A copy with every non-None value replaced (CLI/API options)."""
        unknown = sorted(set(values) - {f.name for f in fields(self)})
        if unknown:
            raise HuatuoError(f"{unknown[0]!r} is not a generation option: use one of "
                              f"{', '.join(f.name for f in fields(self))}.")
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


# Below this a sampled answer is greedy in all but name, and float32 logits divided
# by it overflow to inf (1e-310 made every probability NaN): 0 is the way to ask for greedy.
MIN_TEMPERATURE = 1e-4


def _finite(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


# option -> (is the value acceptable, what to use instead); None is accepted only for seed
GENERATION_RULES = {
    "temperature": (lambda v: _finite(v) and (v == 0 or v >= MIN_TEMPERATURE),
                    f"use 0 for greedy or a number from {MIN_TEMPERATURE:g} up (upstream uses 0.2)"),
    "top_p": (lambda v: _finite(v) and 0 <= v <= 1, "use a number from 0 to 1 (1 turns it off)"),
    "top_k": (lambda v: _whole(v) and v >= 0, "use a whole number from 0 up (0 turns it off)"),
    "repetition_penalty": (lambda v: _finite(v) and v > 0, "use a number above 0 (1 turns it off)"),
    "max_new_tokens": (lambda v: _whole(v) and v >= 1, "use a whole number from 1 up"),
    "seed": (lambda v: v is None or (_whole(v) and v >= 0), "use a whole number from 0 up"),
}


def check_generation_option(name: str, value) -> None:
    """Raise HuatuoError naming `name` when `value` cannot be used for it."""
    ok, advice = GENERATION_RULES[name]
    if not ok(value):
        raise HuatuoError(f"{name} = {value!r} cannot be used: {advice}.")


# -------------------------------------------------------------- variants ----
@dataclass(frozen=True)
class Variant:
    """One upstream checkpoint layout, recognised by config and tensor names."""

    name: str                 # our short name: "7b", "34b", "7b-hf"
    architecture: str         # config.json "architectures"[0]
    model_type: str           # config.json "model_type"
    text_arch: str            # its LLM's architecture: a key of families.text.TEXT_ARCHS
    hub_repo: str             # upstream repository on the hub
    layout: str               # "llava" (model.mm_projector...) or "hf" (multi_modal_projector...)
    notes: str = ""
    hub_aliases: tuple = field(default_factory=tuple)


# ------------------------------------------------------------ notices ----
RESEARCH_NOTICE = (
    "HuatuoGPT-Vision is for research use only: its answers are not medical advice "
    "and must not be used for clinical decisions. (Silence with --quiet or "
    "HUATUO_LITE_NO_NOTICE=1.)"
)
DEMO_NOTICE = (
    "Using the bundled demo model: a pipeline demonstration trained on synthetic "
    "shapes, not a medical model."
)


# ------------------------------------------------------------ evaluation ----
# Upstream eval.py's closed-question prompt: "{question}\nA. {opt}\nB. {opt}...\n" + suffix.
EVAL_OPTION_LETTERS = "ABCDEFGHIJK"   # upstream opt_title: at most 11 options are shown
EVAL_ANSWER_SUFFIX = "Answer with the option's letter from the given choices directly."
# Upstream generates up to 256 tokens, but its scorer reads only the first
# standalone letter, which an instructed model gives in its first few tokens;
# 16 leaves room for "The answer is (B)." or "答案是B" and keeps a benchmark
# run ~16x cheaper than 256. Raise it (--max-tokens) for chatty models.
EVAL_MAX_NEW_TOKENS = 16
EVAL_SKIPPED_QUESTION_TYPES = ("open",)   # upstream scores closed questions only
