"""The one registry of model formats: what the store, the backends, `convert` and
`eval --compare` need to know about each kind of model folder.

Adding a format = one `Format` entry in FORMATS + its backend module (with
`open_engine(model_dir, **options)`) + its converter. Every other table
(BACKEND_MODULES, FORMAT_BACKEND, SPEC_BACKEND, QUANT_OPTIONS, MANIFEST_QUANTS, the
convert command's --quant choices) is derived here, so none can be forgotten.

This module sits at the bottom of the package: it imports nothing from it and
nothing heavy. Backends are named by module path and imported lazily by
`backends.load_backend`; the torch reference lives on the heavy side
(huatuo_lite.convert) and is only ever named, never imported, from the runtime.
The converters keep their own quant tables (convert/gguf/export.py,
convert/onnx/quant.py); tests/test_formats.py asserts they equal the names here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def _text_file_quants(manifest: dict) -> set:
    """GGUF: the quants of the files holding the language model (role "text"); a
    folder may hold several, and its mmproj may carry another quant."""
    return {str(e.get("quant")).upper() for e in manifest.get("files", {}).values()
            if e.get("role") == "text" and e.get("quant")}


def _onnx_section_quant(manifest: dict) -> set:
    """ONNX: one decoder quant per folder, in the manifest's "onnx" section."""
    quant = manifest.get("onnx", {}).get("quant")
    return {str(quant).upper()} if quant else set()


@dataclass(frozen=True)
class Format:
    name: str                     # manifest "format" value; "upstream" for a checkpoint (config.json)
    backend: str                  # engine name (--backend): "torch", "gguf", "onnx"
    module: str                   # module with open_engine(), imported by name when first used
    spec: str                     # `eval --compare` spec prefix: "reference", "gguf", "onnx"
    quants: tuple = ()            # `convert <name> --quant` choices, in the order --help lists them
    default_quant: str | None = None
    side_quants: tuple = ()       # the vision side's quant choices (--mmproj-type / --vision-quant)
    default_side_quant: str | None = None
    load_quant: bool = False      # a folder may hold several quants: open_engine(quant=...) picks one
    roles: tuple = ()             # manifest file roles its converter writes
    # manifest -> the quants its language model is stored in (what `FORMAT:QUANT` specs match)
    manifest_quants: Callable[[dict], set] = lambda manifest: set()

    def load_options(self, quant: str | None) -> dict:
        """open_engine options that pick `quant` inside a folder of this format."""
        return {"quant": quant} if self.load_quant else {}


UPSTREAM = Format(
    name="upstream", backend="torch", module="huatuo_lite.convert.reference.engine", spec="reference",
)
GGUF = Format(
    name="gguf", backend="gguf", module="huatuo_lite.backends.gguf", spec="gguf",
    quants=("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"), default_quant="Q4_K_M",
    side_quants=("F16", "Q8_0"), default_side_quant="F16",
    load_quant=True,
    roles=("text", "mmproj", "vision", "data"),   # vision: vision.onnx (+ its data) beside the mmproj
    manifest_quants=_text_file_quants,
)
ONNX = Format(
    name="onnx", backend="onnx", module="huatuo_lite.backends.onnx", spec="onnx",
    quants=("int4", "int8", "fp16", "fp32"), default_quant="int4",
    side_quants=("fp32", "int8"), default_side_quant="fp32",
    roles=("vision", "embed", "decoder", "data", "tokenizer"),
    manifest_quants=_onnx_section_quant,
)

# manifest "format" -> Format (the reference first: `eval --compare` lists it first)
FORMATS = {f.name: f for f in (UPSTREAM, GGUF, ONNX)}

# ------------------------------------------------------------ derived tables ----
BACKEND_MODULES = {f.backend: f.module for f in FORMATS.values()}          # backend -> module
FORMAT_BACKEND = {f.name: f.backend for f in FORMATS.values()}             # manifest format -> backend
SPEC_BACKEND = {f.spec: f.backend for f in FORMATS.values()}               # compare spec prefix -> backend
QUANT_OPTIONS = {f.backend: f.load_options for f in FORMATS.values()}      # backend -> quant -> load options
MANIFEST_QUANTS = {f.name: f.manifest_quants for f in FORMATS.values() if f.quants}   # format -> manifest -> quants
