"""Where models live and what kind each folder is.

A model folder is one of: an upstream checkpoint (config.json + safetensors:
the torch reference runs it), or a converted folder with a manifest.json whose
"format" names its backend. The kind is read from the files, never the name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ModelFormatError
from .formats import FORMAT_BACKEND   # manifest "format" (or "upstream" for a checkpoint) -> its backend
DEFAULT_HOME = Path("~/.cache/huatuo-lite")


def home() -> Path:
    """The store's root: HUATUO_LITE_HOME, else ~/.cache/huatuo-lite."""
    return Path(os.environ.get("HUATUO_LITE_HOME") or DEFAULT_HOME).expanduser()


def detect_format(folder: Path) -> str:
    """"gguf", "onnx" or "upstream", from the folder's files."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            data = None
        fmt = data.get("format") if isinstance(data, dict) else None
        if fmt in FORMAT_BACKEND:
            return fmt
        raise ModelFormatError(f"{manifest} names no known format; convert the model again.")
    if (folder / "config.json").is_file():
        return "upstream"
    raise ModelFormatError(
        f"{folder} is not a model folder (no manifest.json or config.json); "
        "point --model at an upstream checkpoint or a folder made by `huatuo-lite convert`."
    )


DEMO_NAME = "demo"   # what `models list` calls the bundled demo model; `-m demo` runs it


def demo_model() -> Path | None:
    """The bundled demo model's GGUF folder, if this install ships it."""
    import importlib.resources

    folder = Path(str(importlib.resources.files("huatuo_lite.models").joinpath("demo", "gguf")))
    return folder if (folder / "manifest.json").is_file() else None


def is_demo(folder) -> bool:
    demo = demo_model()
    return demo is not None and Path(folder).resolve() == demo.resolve()


def default_model() -> Path | str | None:
    """What `ask` runs without --model: $HUATUO_LITE_MODEL, else the only model in
    the store, else the bundled demo model, else None."""
    if os.environ.get("HUATUO_LITE_MODEL"):
        return os.environ["HUATUO_LITE_MODEL"]
    installed = stored_models()
    if len(installed) > 1:
        raise ModelFormatError(
            f"{len(installed)} models are installed ({', '.join(installed)}): choose one with --model "
            "or set HUATUO_LITE_MODEL.")
    if installed:
        return next(iter(installed.values()))
    return demo_model()


def resolve(model: str | os.PathLike) -> Path:
    """A model folder from a path, a store name, a registry name or hub repo id
    (its pulled folder), or a repo already in the huggingface-hub cache. Never
    touches the network."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelFormatError(f"{path} is a file; point --model at the model's folder.")
    name = str(model)
    for candidate in (name, registry_name(name), name.replace("/", "--")):
        if candidate and (home() / "models" / candidate).is_dir():
            return home() / "models" / candidate
    if name == DEMO_NAME and demo_model() is not None:   # the bundled demo: `-m demo`
        return demo_model()
    cached = hub_cache_snapshot(name)
    if cached is not None:
        return cached
    raise ModelFormatError(
        f"No model {name!r} here, in {home() / 'models'} or in the huggingface-hub cache; give a model "
        "folder, `huatuo-lite models pull NAME`, or convert one with `huatuo-lite convert gguf SRC OUT`."
    )


def registry_name(name_or_repo: str) -> str | None:
    """The registry name for a registry name or its hub repo id."""
    for name, entry in registry().items():
        if name_or_repo in (name, entry["repo"]):
            return name
    return None


def hub_cache_snapshot(repo_id: str) -> Path | None:
    """A repo already downloaded into the huggingface-hub cache (local files only)."""
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except Exception:  # not cached, or an invalid id: the caller says what to do
        return None


def backend_for(folder: Path, requested: str | None) -> str:
    """The backend to run `folder` with: the requested one if it fits the folder."""
    fmt = detect_format(folder)
    natural = FORMAT_BACKEND[fmt]
    if requested is None or requested == natural:
        return natural
    raise ModelFormatError(
        f"{folder} holds a {fmt} model, which the {requested} backend cannot run; "
        f"use --backend {natural}, or convert it with `huatuo-lite convert {requested} {folder} OUT`."
    )


# ---------------------------------------------------------------- registry ----
def registry() -> dict:
    """Known models from models/registry.toml: name -> entry dict."""
    import importlib.resources
    import tomllib

    text = importlib.resources.files("huatuo_lite.models").joinpath("registry.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["models"]


def stored_models() -> dict:
    """Folders in the store: name -> path."""
    root = home() / "models"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def pull(name: str, progress: bool = True) -> Path:
    """Download a registry model with huggingface-hub (resumable, its own cache
    and progress bars) into the store; refused while HF_HUB_OFFLINE is set."""
    entry = registry().get(name)
    if entry is None:
        raise ModelFormatError(f"No model {name!r} in the registry; `huatuo-lite models list` shows the known ones.")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelFormatError(
            f"HF_HUB_OFFLINE is set, so {entry['repo']} cannot be downloaded; unset it to pull, "
            "or copy the model folder here by hand."
        )
    from huggingface_hub import snapshot_download

    target = home() / "models" / name
    # downloaded under a hidden name (not listed, not used by `ask`) and renamed when
    # complete; a failed pull resumes from the same hidden folder next time
    pulling = home() / "models" / f".{name}.pulling"
    try:
        snapshot_download(repo_id=entry["repo"], allow_patterns=entry.get("files"), local_dir=pulling)
    except Exception as exc:
        from .fsutil import disk_full_error

        if disk_full_error(exc):
            raise ModelFormatError(f"The disk holding {pulling.parent} filled up while downloading {entry['repo']}; "
                                   "free some space and pull again (the download resumes).") from None
        if not _network_error(exc):
            raise
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None:       # the Hub answered: gated, missing or refused
            raise ModelFormatError(f"The Hugging Face Hub refused {entry['repo']} (HTTP {status}); log in with "
                                   "`hf auth login` if it is gated, or copy the model folder by hand.") from None
        raise ModelFormatError(
            f"Cannot reach the Hugging Face Hub to download {entry['repo']} ({type(exc).__name__}): check the "
            f"network, or copy the model folder to {target} by hand and set HF_HUB_OFFLINE=1."
        ) from None
    if target.is_dir() and not target.is_symlink():
        import shutil

        shutil.rmtree(target)
    os.replace(pulling, target)
    return target


def _network_error(exc: BaseException) -> bool:
    """A connection, DNS, HTTP or timeout failure (huggingface-hub wraps them in its own types)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"LocalEntryNotFoundError", "HfHubHTTPError", "ConnectionError", "Timeout",
                         "RequestException", "HTTPError", "TimeoutError", "ConnectError", "TransportError",
                         "OfflineModeIsEnabled"})


def verify(folder: Path) -> list[str]:
    """Files of a converted folder whose sha256 differs from its manifest."""
    from .manifest import read_manifest, verify_hashes

    return verify_hashes(folder, read_manifest(folder))


def describe(folder: Path) -> dict:
    """A short summary of a model folder for `models info`."""
    fmt = detect_format(folder)
    info = {"path": str(folder), "format": fmt, "backend": FORMAT_BACKEND[fmt]}
    if fmt == "upstream":
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        info.update(architecture=(config.get("architectures") or ["?"])[0], model_type=config.get("model_type"))
    else:
        from .manifest import read_manifest

        manifest = read_manifest(folder)
        info.update({k: manifest.get(k) for k in ("name", "variant", "text", "vision")})
        info["files"] = {name: {k: e.get(k) for k in ("role", "size", "quant")} for name, e in manifest["files"].items()}
    return info


def remove(name: str) -> Path:
    """Delete a model folder from the store (never anything outside it)."""
    import shutil

    folder = stored_models().get(name)
    if folder is None:
        raise ModelFormatError(f"No model {name!r} in {home() / 'models'}; `huatuo-lite models list` shows them.")
    if folder.is_symlink():       # a link to a folder elsewhere: remove the link, keep what it points to
        folder.unlink()
        return folder
    shutil.rmtree(folder)
    return folder
