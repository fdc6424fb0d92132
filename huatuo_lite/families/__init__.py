"""Model families: what each provides (variants, prompt, image and generation facts,
its text architectures). A new family is one module here plus a row in FAMILIES.

    llava     HuatuoGPT-Vision 7B / 34B (2024, LLaVA layout): families/llava.py
    qwen25vl  HuatuoGPT-Vision-7B-Qwen2.5VL (2025, standard Qwen2.5-VL): families/qwen25vl.py

A converted folder's manifest names its family ("family"; absent in folders written
before the second family: llava); every engine carries it as `engine.family`.
"""
from __future__ import annotations

from types import ModuleType

from ..errors import ModelFormatError
from . import llava, qwen25vl

DEFAULT = "llava"
FAMILIES: dict[str, ModuleType] = {"llava": llava, qwen25vl.NAME: qwen25vl}
# every upstream layout we read, by config.json "architectures"[0]
VARIANTS = {**llava.VARIANTS, **qwen25vl.VARIANTS}
VARIANT_BY_ARCHITECTURE = {v.architecture: v for v in VARIANTS.values()}
VARIANT_BY_MODEL_TYPE = {v.model_type: v for v in VARIANTS.values()}
FAMILY_BY_VARIANT = {name: family for family, module in FAMILIES.items() for name in module.VARIANTS}


def config_family(config) -> str | None:
    """The family an upstream config.json (a dict) declares: by its "architectures", or by
    "model_type" when it names none; None when it is no layout we read."""
    if not isinstance(config, dict):
        return None
    archs = config.get("architectures")
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    variant = (next((VARIANT_BY_ARCHITECTURE[a] for a in archs if a in VARIANT_BY_ARCHITECTURE), None) if archs
               else VARIANT_BY_MODEL_TYPE.get(config.get("model_type")))
    return FAMILY_BY_VARIANT[variant.name] if variant else None


def family_module(name: str | None) -> ModuleType:
    """The facts module of a family name (None: the LLaVA family)."""
    module = FAMILIES.get(name or DEFAULT)
    if module is None:
        raise ModelFormatError(f"This model is of the family {name!r}, which this huatuo-lite does not know "
                               f"(it knows {', '.join(FAMILIES)}): upgrade huatuo-lite or convert the model again.")
    return module


def family_of(engine) -> ModuleType:
    """The facts module of an engine's model."""
    return family_module(getattr(engine, "family", None))


def generation_defaults(engine):
    """The model's own generation defaults (a converted folder records its checkpoint's
    generation_config) or its family's."""
    return getattr(engine, "generation_defaults", None) or family_of(engine).GENERATION_DEFAULTS
