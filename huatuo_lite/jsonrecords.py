"""Read JSON files a user hands us: a dataset file that holds a JSON list of records (eval or
PubMedVision format), or a config file that holds one JSON object."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import HuatuoError


def read_record_list(path: Path, kind: str, what_to_give: str) -> list:
    """The list of records in `path`; one sentence if it is missing, not JSON or not a list.

    kind names the file in messages ("eval file"); what_to_give ends the sentence
    that tells the user which file to pass."""
    path = Path(path)
    if path.exists() and not path.is_file():     # a FIFO would block the read, a device never end
        raise HuatuoError(f"The {kind} {path} is not a regular file; give {what_to_give}.")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HuatuoError(f"No {kind} {path}; give {what_to_give}.") from None
    except OSError as exc:
        raise HuatuoError(f"The {kind} {path} cannot be read ({exc.strerror}); give {what_to_give}.") from None
    except (ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if isinstance(exc, ValueError) else "nested too deeply"
        raise HuatuoError(f"{path} is not readable JSON ({reason}); give {what_to_give}.") from None
    if not isinstance(records, list):
        raise HuatuoError(f"{path} must hold a JSON list of records.")
    return records


def read_json_object(path: Path, fix: str, error: type[HuatuoError] = HuatuoError) -> dict:
    """The JSON object in `path` (config.json, tokenizer_config.json, ...); one sentence ending
    in `fix` (what to do) if it cannot be read, is not JSON or holds no object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{path} is not readable JSON ({reason}); {fix}.") from None
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object; {fix}.")
    return data
