"""Resumable results files, shared by `eval` and `batch`: one JSON row per answered
record, appended as it goes, plus a settings file that a resumed run must match.

A run killed mid-write leaves a torn last line: it is cut off before appending.
Anything else that is not a row this program wrote (a file edited by hand, another
dataset's results, settings that are not a JSON object) is one sentence, never a
traceback and never a silently mixed report.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import HuatuoError


def cut_torn_line(path: Path) -> bytes:
    """The file's complete lines (bytes); a torn last line is truncated away."""
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(len(complete))
    return complete


def read_rows(path: Path, keys: dict, other: str = "dataset") -> list[dict]:
    """Validated rows of a results file, in file order. `keys` maps record index ->
    record key; a row whose index names a record of ours with another key means the
    file belongs to another `other` (dataset, eval file)."""
    if not path.is_file():
        return []
    try:
        text = cut_torn_line(path).decode("utf-8")
    except UnicodeDecodeError:
        raise HuatuoError(f"{path} is not UTF-8 text (edited or overwritten?); use another --out or delete it.") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise HuatuoError(f"Line {number} of {path} is not JSON (edited by hand?); fix or delete it.") from None
        if not isinstance(row, dict) or not isinstance(row.get("index"), int) or isinstance(row["index"], bool) \
                or not isinstance(row.get("key"), str):
            raise HuatuoError(f"Line {number} of {path} is not a result row with an index and key "
                              "(edited by hand?); fix or delete it.")
        if keys.get(row["index"], row["key"]) != row["key"]:
            raise HuatuoError(f"{path} holds results of another {other}; use another --out or delete it.")
        rows.append(row)
    return rows


def check_settings(path: Path, info: dict, results: Path) -> None:
    """Refuse to resume `results` when `path` records other settings; write `path`
    (atomically) when there is none yet."""
    from .fsutil import atomic_path

    if path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError, UnicodeDecodeError):
            before = None
        if not isinstance(before, dict):
            raise HuatuoError(f"{path} (the settings {results} was made with) is not a JSON object (edited by hand?); "
                              "delete both to start over, or restore it.")
        changed = sorted(k for k in set(before) | set(info) if before.get(k) != info.get(k))
        if changed:
            raise HuatuoError(f"{results} holds results made with other settings ({', '.join(changed)}); "
                              "use another --out or delete it to start over.")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
