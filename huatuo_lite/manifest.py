"""manifest.json: what a converted model folder holds, so a backend can check
its files before loading them (and `models verify` can check every byte).

Layout (all keys written by the converters):
{
  "format": "gguf" | "onnx",
  "name": "HuatuoGPT-Vision-7B",
  "variant": "7b",
  "files": {"<relative path>": {"role": "text"|"mmproj"|"vision"|"embed"|"decoder"|"tokenizer"|"data"|...,
                                "sha256": "...", "size": 123, "quant": "Q4_K_M"}},
  "text": {"arch": "qwen2", "n_embd": 3584, "n_vocab": 152064, "n_ctx": 4096, "eos_token_ids": [151643]},
  "vision": {"projector": "mlp2x_gelu", "n_embd_out": 3584, "image_size": 336, "image_tokens": 576},
  "source": {"config_sha256": "...", "path": "..."},
  "tools": {"huatuo-lite": "0.1.0", "gguf": "...", ...},
  ...backend-specific keys (e.g. "mtmd_self_test")
}
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelFormatError
from .fsutil import atomic_path, sha256_file

MANIFEST_NAME = "manifest.json"


def file_entry(path: Path, role: str, **extra) -> dict:
    """A manifest entry for one finished file."""
    return {"role": role, "sha256": sha256_file(path), "size": path.stat().st_size, **extra}


def write_manifest(folder: Path | str, manifest: dict) -> Path:
    final = Path(folder) / MANIFEST_NAME
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return final


def read_manifest(folder: Path | str) -> dict:
    """The folder's manifest, or one sentence saying why it cannot be used."""
    path = Path(folder) / MANIFEST_NAME
    if path.exists() and not path.is_file():
        raise ModelFormatError(f"{path} is not a regular file (a folder, pipe or device); "
                               "convert the model again.")
    if not path.is_file():
        raise ModelFormatError(
            f"{folder} has no {MANIFEST_NAME}: it was not written by `huatuo-lite convert`; "
            "convert the model again or point --model at a converted folder."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
        raise ModelFormatError(f"{path} is unreadable ({reason}); convert the model again.") from None
    problem = manifest_problem(manifest)
    if problem:
        raise ModelFormatError(f"{path} is not a valid manifest ({problem}); convert the model again.")
    return manifest


def _entry_problem(name, entry) -> str | None:
    """What is wrong with one "files" entry, or None."""
    if not isinstance(entry, dict):
        return f"the entry of {name!r} is not an object"
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\0" in name:
        return f"the file name {name!r} leaves the model folder"
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"the size of {name!r} is not a byte count"
    if not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("role"), str):
        return f"the entry of {name!r} lacks its role or sha256 text"
    return None


def manifest_problem(manifest) -> str | None:
    """What makes a parsed manifest unusable, in a few words; None if it is usable
    (an object with a "format" text and a "files" object of well-formed entries)."""
    if not isinstance(manifest, dict):
        return f"it holds a JSON {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("format"), str):
        return "it has no \"format\" text"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "it has no \"files\" object"
    return next((p for p in (_entry_problem(n, e) for n, e in files.items()) if p), None)


def files_with_role(folder: Path | str, manifest: dict, role: str) -> list[Path]:
    return [Path(folder) / name for name, entry in sorted(manifest.get("files", {}).items())
            if entry.get("role") == role]


def check_sizes(folder: Path | str, manifest: dict) -> None:
    """Cheap check before loading: every file present with its recorded size
    (a truncated download or copy is caught here, without hashing gigabytes)."""
    for name, entry in manifest.get("files", {}).items():
        path = Path(folder) / name
        if path.exists() and not path.is_file():
            raise ModelFormatError(f"{path} is not a regular file (a folder, pipe or device); "
                                   "copy or download the model folder again.")
        if not path.is_file():
            raise ModelFormatError(f"{path} is missing; copy or download the model folder again.")
        if path.stat().st_size != entry["size"]:
            raise ModelFormatError(
                f"{path} is {path.stat().st_size} bytes but the manifest says {entry['size']}: "
                "the file is truncated or replaced; download or convert it again."
            )


def verify_hashes(folder: Path | str, manifest: dict) -> list[str]:
    """Names of files whose sha256 differs from the manifest (empty = all good)."""
    check_sizes(folder, manifest)
    return [name for name, entry in sorted(manifest["files"].items())
            if sha256_file(Path(folder) / name) != entry["sha256"]]
