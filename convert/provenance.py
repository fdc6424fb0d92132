"""Where a converted model came from, for its manifest: the source config's
hash and the versions of the tools that wrote it (shared by GGUF and ONNX)."""
from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path


def config_hash(ckpt) -> str:
    """sha256 of the source's config.json (of the parsed config when there is no file)."""
    path = Path(ckpt.root) / "config.json"
    data = path.read_bytes() if path.is_file() else json.dumps(ckpt.config, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def source_entry(ckpt) -> dict:
    return {"config_sha256": config_hash(ckpt), "path": str(Path(ckpt.root).resolve())}


def version(dist: str) -> str | None:
    """An installed distribution's version, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
