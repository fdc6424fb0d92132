"""`huatuo-lite models list|pull|verify|info|rm|cache`: the local model store and its disk cache."""
from __future__ import annotations

import json

import click

from .. import store
from ..errors import HuatuoError
from ..manifest import read_manifest
from ..llama_tools import self_test_verdict


@click.group()
def models():
    """Manage models in the store ($HUATUO_LITE_HOME, default ~/.cache/huatuo-lite)."""


@models.command("list")
def models_list():
    """Installed models and the registry's known ones.

    \b
    Example:
      huatuo-lite models list
    """
    installed = store.stored_models()
    for name, path in installed.items():
        try:
            fmt = store.detect_format(path)
        except HuatuoError:
            fmt = "unknown"
        click.echo(f"{name:32} installed  {fmt:9} {folder_family(path):9} {path}")
    demo = store.demo_model()
    if demo is not None and store.DEMO_NAME not in installed:
        click.echo(f"{store.DEMO_NAME:32} bundled    {'gguf':9} {demo} (synthetic-shapes demo, not a medical model)")
    for name, entry in store.registry().items():
        if name not in installed:
            click.echo(f"{name:32} available {entry['format']:9} {entry['repo']} (~{entry['size_gb']:g} GB, {entry['license']})")


@models.command("pull")
@click.argument("name")
def models_pull(name):
    """Download a registry model with huggingface-hub (resumable).

    \b
    Example:
      huatuo-lite models pull huatuogpt-vision-7b
    """
    click.echo(str(store.pull(name)))


@models.command("verify")
@click.argument("model")
def models_verify(model):
    """Check every file of a converted model against its manifest's sha256.

    \b
    Example:
      huatuo-lite models verify ./hv7b-gguf
    """
    folder = store.resolve(model)
    bad = store.verify(folder)
    if bad:
        raise HuatuoError(f"{len(bad)} file(s) of {folder} differ from the manifest ({', '.join(bad)}); download or convert again.")
    click.echo(f"{folder}: all files match the manifest.")


@models.command("info")
@click.argument("model")
def models_info(model):
    """Show what a model folder holds (format, backend, files, dimensions).

    \b
    Example:
      huatuo-lite models info ./hv7b-gguf
    """
    folder = store.resolve(model)
    info = {**store.describe(folder), "family": folder_family(folder)}
    if info["format"] == "gguf":   # whether stock llama.cpp's image path is right for it
        info["image_path_self_test"] = self_test_verdict(read_manifest(folder).get("mtmd_self_test"))
    click.echo(json.dumps(info, indent=2))


def folder_family(folder) -> str:
    """The model family of a folder (llava | qwen25vl): a converted folder's manifest says it
    (absent: llava, written before the second family); an upstream one's config.json
    architecture; "unknown" for a folder that is neither."""
    from ..families import DEFAULT, FAMILY_BY_VARIANT, VARIANT_BY_ARCHITECTURE
    from ..jsonrecords import read_json_object

    try:
        if store.detect_format(folder) != "upstream":
            return read_manifest(folder).get("family") or DEFAULT
        config = read_json_object(folder / "config.json", "restore it")
    except HuatuoError:
        return "unknown"
    variant = VARIANT_BY_ARCHITECTURE.get(((config.get("architectures") or [None])[0]))
    return FAMILY_BY_VARIANT[variant.name] if variant else "unknown"


@models.command("rm")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def models_rm(name, yes):
    """Delete a model from the store.

    \b
    Example:
      huatuo-lite models rm huatuogpt-vision-7b --yes
    """
    if not yes:
        click.confirm(f"Delete {name} from {store.home() / 'models'}?", abort=True)
    linked = (store.home() / "models" / name).is_symlink()
    removed = store.remove(name)
    click.echo(f"removed the link {removed} (the folder it pointed to was kept)" if linked else f"removed {removed}")


@models.group("cache")
def models_cache():
    """The disk cache of image features and prompt prefixes (KV state): a second question
    about the same image, even from a new process, skips the image's encoding and prefill.
    Folder: $HUATUO_LITE_CACHE (default: the store's cache/); cap: $HUATUO_LITE_CACHE_MAX_BYTES
    (default 2G), least recently used entries evicted first; off: `huatuo-lite --no-cache`."""


@models_cache.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def models_cache_info(as_json):
    """Where the cache is, how many entries, their size and the cap.

    \b
    Example:
      huatuo-lite models cache info
    """
    from ..fsutil import human_size
    from ..prefix_cache import DiskCache

    info = DiskCache().info()
    if as_json:
        click.echo(json.dumps(info))
        return
    sizes = info["sizes"]
    largest = f", largest entry {human_size(max(sizes))}" if sizes else ""
    click.echo(f"{info['folder']}: {info['entries']} entries, {human_size(info['bytes'])} of "
               f"{human_size(info['max_bytes'])}{largest}")


@models_cache.command("clear")
def models_cache_clear():
    """Delete every cache entry (models are kept).

    \b
    Example:
      huatuo-lite models cache clear
    """
    from ..prefix_cache import DiskCache

    cache = DiskCache()
    removed = cache.clear()
    click.echo(f"removed {removed} cache entries from {cache.folder}")
