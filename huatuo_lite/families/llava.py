"""The 2024 family: HuatuoGPT-Vision 7B / 34B in the LLaVA layout (and the -hf re-release).

Everything upstream fixes for this family (prompt template, image preprocessing
constants, generation defaults, the variants and how to recognise them) lives here
once. Backends and converters derive what they need from these values; none of them
restates a constant. What all families share is in common.py (re-exported here).
"""
from __future__ import annotations

# Shared facts, re-exported for the modules that import them from here.
from .common import (CLIP_MEAN, CLIP_STD, RESCALE, DEMO_NOTICE, EVAL_ANSWER_SUFFIX, EVAL_MAX_NEW_TOKENS, EVAL_OPTION_LETTERS,  # noqa: F401
                     EVAL_SKIPPED_QUESTION_TYPES, GENERATION_RULES, MAX_IMAGE_FILE_BYTES, MAX_IMAGE_PIXELS,
                     MAX_REQUEST_PIXELS, MIN_TEMPERATURE, RESEARCH_NOTICE, GenerationConfig, Variant,
                     check_generation_option)
from .text import LLAMA, QWEN2

NAME = "llava"

# ---------------------------------------------------------------- prompt ----
# Upstream renders a turn as "<|user|>\n{images}{question}\n<|assistant|>\n" in
# plain text: no system prompt, no BOS, and the tags are NOT special tokens.
USER_TAG = "<|user|>\n"
ASSISTANT_TAG = "<|assistant|>\n"
IMAGE_PLACEHOLDER = "<image>"
IMAGE_LINE = IMAGE_PLACEHOLDER + "\n"  # one per image, at the front of the turn
# An earlier turn's answer is followed by " \n" (sic: a space) upstream.
ANSWER_SUFFIX = " \n"
MAX_IMAGES = 6
CONTEXT_LENGTH = 4096  # tokenizer_model_max_length upstream
RESERVED_MEANING = "marks where image features go"


def reserved_in(question: str) -> str | None:
    """The placeholder text a question may not hold (upstream would delete it), or None."""
    return IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in question else None


# ----------------------------------------------------------------- image ----
IMAGE_SIZE = 336            # CLIP ViT-L/14-336 input side
PATCH_SIZE = 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576 features per image (CLS dropped)
IMAGE_MEAN, IMAGE_STD = CLIP_MEAN, CLIP_STD
# expand2square pads with tuple(int(x * 255) for x in image_mean) = (122, 116, 104)
PAD_COLOR = tuple(int(m * 255) for m in IMAGE_MEAN)
VISION_SELECT_LAYER = -2     # hidden_states[-2], CLS dropped ("patch")


def grid_of(pixels) -> None:
    """Positions are 1-D: an image's feature grid does not enter them."""
    return None


IMAGE_ADVICE = "fewer images"   # what shortens a prompt's image part (every image is 576 tokens)


def image_tokens(pixels) -> int:
    """Every image gives 576 features (CLS dropped)."""
    return IMAGE_TOKENS


# ------------------------------------------------------------ generation ----
GENERATION_DEFAULTS = GenerationConfig()
PENALIZE_PROMPT = False   # upstream passes inputs_embeds only: the penalty never sees the prompt


# -------------------------------------------------------------- variants ----
VARIANTS = {
    v.name: v
    for v in (
        Variant("7b", "LlavaQwen2ForCausalLM", "llava_qwen2", QWEN2.name,
                "FreedomIntelligence/HuatuoGPT-Vision-7B", "llava"),
        Variant("34b", "LlavaLlamaForCausalLM", "llava_llama", LLAMA.name,
                "FreedomIntelligence/HuatuoGPT-Vision-34B", "llava"),
        Variant("7b-hf", "LlavaForConditionalGeneration", "llava", QWEN2.name,
                "FreedomIntelligence/HuatuoGPT-Vision-7B-hf", "hf",
                hub_aliases=("FreedomIntelligence/HuatuoGPT-Vision-34B-hf",)),
    )
}
VARIANT_BY_ARCHITECTURE = {v.architecture: v for v in VARIANTS.values()}

