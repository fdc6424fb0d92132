"""Who a converted model is: its name, the GGUF `general.*` keys and the card's front matter.

One record (ModelMeta) feeds the GGUF writers (text and mmproj), the Ollama Modelfile and the
Hugging Face model card, so the three never disagree. Names follow the GGUF naming
convention (`<BaseName>-<SizeLabel>-<Encoding>.gguf`, e.g. HuatuoGPT-Vision-7B-Q4_K_M.gguf):
a size label at the end of the model's name ("-7B", "-34B") is split off as
general.size_label; a name without one keeps its whole self as the basename and the label is
computed from the checkpoint's parameter count (gguf-py's size_label, as convert_hf_to_gguf
does). gguf-py's own name heuristic is not used: it reads "HuatuoGPT-Vision-7B" as fine-tune
"HuatuoGPT", version "Vision-7b" when the parameter count disagrees with the "7B".
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFWriter
from gguf.utility import size_label as gguf_size_label

from .provenance import version

HUB_URL = "https://huggingface.co/"
SIZE_SUFFIX = re.compile(r"^(?P<base>.+?)-(?P<size>\d+(?:\.\d+)?[KMBT])$", re.I)
DEFAULT = object()     # "derive it from the checkpoint" for the keyword arguments below


@dataclass(frozen=True)
class ModelMeta:
    name: str                    # general.name and the file names' stem
    basename: str | None         # general.basename
    size_label: str | None       # general.size_label, e.g. "7B", "4.4M"
    license: str | None          # SPDX-like id from the source ("apache-2.0"), None if unknown
    base_repo: str | None        # "org/name" of the model this is a conversion of, None if none
    quantized_by: str            # general.quantized_by

    @property
    def base_url(self) -> str | None:
        return HUB_URL + self.base_repo if self.base_repo else None


def folder_name(root) -> str:
    """The model's name from its folder, or the repository's for a huggingface-hub cache
    snapshot (.../models--Org--Name/snapshots/<sha>); cleaned for file names."""
    parts = Path(root).resolve().parts
    hub_snapshot = len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--")
    name = parts[-3].split("--")[-1] if hub_snapshot else parts[-1]
    return clean_name(name)


def clean_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def parameter_count(ckpt) -> int:
    """All tensors of the checkpoint (text, vision tower, projector)."""
    return sum(math.prod(ckpt.shape(n)) for n in ckpt.names())


def _front_matter_license(root: Path) -> str | None:
    """`license:` of the source folder's README.md YAML front matter (hub snapshots carry one)."""
    readme = Path(root) / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    found = match and re.search(r"^license:\s*['\"]?([\w.+-]+)", match.group(1), re.M)
    return found.group(1) if found else None


def _registry_license(repo: str | None) -> str | None:
    """The license models/registry.toml records for an upstream repository."""
    from huatuo_lite.store import registry

    return next((e.get("license") for e in registry().values() if e.get("repo") == repo), None)


def model_meta(ckpt, name: str | None = None, base_repo=DEFAULT, license=DEFAULT) -> ModelMeta:  # noqa: A002
    """The record for `ckpt`. Defaults: the folder's name; the base model is the upstream
    repository of the checkpoint's variant (family.VARIANTS) - pass base_repo=None for a model
    that is not a conversion of it (the demo); the license is the source README's, else the
    registry's for that base repository."""
    name = clean_name(name) if name else folder_name(ckpt.root)
    if base_repo is DEFAULT:
        base_repo = getattr(getattr(ckpt, "variant", None), "hub_repo", None)
    if license is DEFAULT:
        license = _front_matter_license(Path(ckpt.root)) or _registry_license(base_repo)  # noqa: A001
    sized = SIZE_SUFFIX.match(name)
    basename, size = (sized["base"], sized["size"].upper()) if sized else (name, None)
    return ModelMeta(name=name, basename=basename, size_label=size or gguf_size_label(parameter_count(ckpt), 0, 0, 0),
                     license=license, base_repo=base_repo, quantized_by=f"huatuo-lite {version('huatuo-lite')}")


def add_general(w: GGUFWriter, meta: ModelMeta) -> None:
    """The standard general.* keys (gguf-py Keys.General) that llama.cpp, Ollama and the hub show."""
    w.add_name(meta.name)
    w.add_basename(meta.basename)
    optional = {w.add_size_label: meta.size_label, w.add_license: meta.license}
    for add, value in optional.items():
        if value:
            add(value)
    w.add_quantized_by(meta.quantized_by)
    if meta.base_repo:
        organization, _, repo_name = meta.base_repo.rpartition("/")
        w.add_base_model_count(1)
        w.add_base_model_name(0, repo_name)
        if organization:
            w.add_base_model_organization(0, organization)
        w.add_base_model_repo_url(0, meta.base_url)


def restamp_gguf(src: Path, dst: Path, meta: ModelMeta, chat_template: str | None = None) -> Path:
    """Copy a GGUF with new general.* keys (and chat template), its tensors byte for byte
    (gguf-py's gguf_new_metadata route): how the shipped demo files got their metadata
    without re-quantizing (tests compare the demo's answers)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    scratch = GGUFWriter(None, arch)          # collects the keys add_general writes
    add_general(scratch, meta)
    new = {key: MetadataDetails(v.type, v.value, sub_type=v.sub_type) for key, v in scratch.kv_data[0].items()
           if key != gguf.Keys.General.ARCHITECTURE}
    if chat_template is not None:
        new[gguf.Keys.Tokenizer.CHAT_TEMPLATE] = MetadataDetails(gguf.GGUFValueType.STRING, chat_template)
    stale = [k for k in reader.fields if k.startswith("general.base_model.") and k not in new]
    writer = GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    copy_with_new_metadata(reader, writer, new, stale)
    return dst
