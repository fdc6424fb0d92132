"""Click parameter types for the generation options, checked by GenerationConfig's rules.

The rules live once, in family.GENERATION_RULES; these types only parse the
text and ask those rules, so `--temperature nan` is a usage error (exit 2) that
says the same sentence the Python API raises.
"""
from __future__ import annotations

import click

from ..errors import HuatuoError
from ..families.common import check_generation_option


class GenerationValue(click.ParamType):
    """A number for one GenerationConfig field, refused before any model loads."""

    def __init__(self, field: str, parse=float):
        self.field, self.parse = field, parse
        self.name = "integer" if parse is int else "float"

    def convert(self, value, param, ctx):
        try:
            number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else self.parse(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a {'whole number' if self.parse is int else 'number'}.", param, ctx)
        try:
            check_generation_option(self.field, number)
        except HuatuoError as exc:
            self.fail(str(exc), param, ctx)
        return number


TEMPERATURE = GenerationValue("temperature")
TOP_P = GenerationValue("top_p")
TOP_K = GenerationValue("top_k", int)
REPETITION_PENALTY = GenerationValue("repetition_penalty")
MAX_TOKENS = GenerationValue("max_new_tokens", int)
SEED = GenerationValue("seed", int)
