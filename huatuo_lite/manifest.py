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
    if not path.is_file():
        raise ModelFormatError(
            f"{folder} has no {MANIFEST_NAME}: it was not written by `huatuo-lite convert`; "
            "convert the model again or point --model at a converted folder."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path} is unreadable ({exc}); convert the model again.") from None


def files_with_role(folder: Path | str, manifest: dict, role: str) -> list[Path]:
    return [Path(folder) / name for name, entry in sorted(manifest.get("files", {}).items())
            if entry.get("role") == role]


def check_sizes(folder: Path | str, manifest: dict) -> None:
    """Cheap check before loading: every file present with its recorded size
    (a truncated download or copy is caught here, without hashing gigabytes)."""
    for name, entry in manifest.get("files", {}).items():
        path = Path(folder) / name
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
