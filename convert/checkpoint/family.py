"""Which family an upstream folder belongs to: the one place the converters, the trainer and
the torch reference ask (each then takes that family's row from its own table)."""
from __future__ import annotations

import json
from pathlib import Path

from huatuo_lite.families import DEFAULT, config_family


def folder_family(root) -> str:
    """The family the folder's config.json declares (families.config_family); the LLaVA family
    when the file is unreadable or names no known layout -- its reader then says what is wrong."""
    try:
        config = json.loads((Path(root).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return DEFAULT
    return config_family(config) or DEFAULT
