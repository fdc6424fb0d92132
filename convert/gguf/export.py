"""`huatuo-lite convert gguf`: upstream folder -> text GGUF + mmproj + vision.onnx + manifest.

F32/F16/BF16/Q8_0 are written directly with the gguf package; the K-quants and
Q4_0 go through llama.cpp's own quantizer (llama_model_quantize) from a lossless
intermediate (BF16 when the checkpoint is bf16, else F32) that is deleted after.
Everything is written in a staging folder and moved into OUT_DIR when complete.
"""
from __future__ import annotations

import importlib
import threading
from contextlib import contextmanager
from pathlib import Path

from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as FT
from tqdm import tqdm

from huatuo_lite.errors import HuatuoError
from huatuo_lite.families import qwen25vl
from huatuo_lite.families.llava import CONTEXT_LENGTH
from huatuo_lite.fsutil import staging_dir
from huatuo_lite.manifest import MANIFEST_NAME, file_entry, read_manifest, write_manifest

from ..provenance import config_hash, source_entry, version
from ..checkpoint.family import folder_family
from ..checkpoint.read import open_checkpoint
from ..onnx.vision_dtype import check_dtype
from .mmproj import PROJECTOR_TYPES, write_mmproj
from .text import write_text_gguf
from ..model_meta import DEFAULT, model_meta

# quant name -> (ggml type of weight matrices, general.file_type), written by the gguf package
DIRECT_TYPES = {
    "F32": (Q.F32, FT.ALL_F32),
    "F16": (Q.F16, FT.MOSTLY_F16),
    "BF16": (Q.BF16, FT.MOSTLY_BF16),
    "Q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0),
}
# quant name -> llama_ftype name in llama_cpp, quantized by llama.cpp itself
LLAMA_QUANTS = {
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
MMPROJ_TYPES = {k: DIRECT_TYPES[k] for k in ("F16", "Q8_0")}
# the intermediate for llama.cpp's quantizer: lossless for the stored dtype
INTERMEDIATE = {"bfloat16": "BF16"}
VISION_ONNX = "vision.onnx"
# text quants of the reference conversion: their --vision-dtype auto means fp32 (a lossy vision
# graph beside an F32 text would make it inexact). Not backends.gguf.EXACT_QUANTS, which picks
# the attention settings of F32/F16/BF16 files.
REFERENCE_QUANTS = ("F32",)
# families with their own exporter: family name (checkpoint.family.folder_family) ->
# (module relative to this package, function)
FAMILY_EXPORTERS = {qwen25vl.NAME: ("..qwen25vl.gguf", "export_qwen25vl_gguf")}


def export_gguf(src, out_dir, quant: str = "Q4_K_M", mmproj_type: str = "F16",
                vision_onnx: bool = True, allow_pickle: bool = False, threads: int | None = None,
                imatrix=None, name: str | None = None, base_repo=DEFAULT, license=DEFAULT,  # noqa: A002
                vision_dtype: str = "auto", vision_gate: float | None = None) -> Path:
    """Convert `src` into `out_dir`; returns the path of the text GGUF. `threads`: for
    llama.cpp's quantizer and the libmtmd self-test (default: all cores / 1). `vision_dtype`:
    vision.onnx's weights (convert/onnx/vision_dtype.py: auto keeps its smaller graph only
    when it passes the fidelity gate, per-token cosine >= `vision_gate`). `imatrix`: a
    calibration JSON; the quant then uses an importance matrix (convert/gguf/imatrix.py, needs
    the native tools). `name`, `base_repo`, `license`: the model's identity (model_meta;
    default: the folder's name, the variant's upstream repository and its license).
    Beside the files: manifest.json, an Ollama Modelfile and a README.md model card.
    A checkpoint of another family goes to that family's exporter (FAMILY_EXPORTERS)."""
    family = folder_family(src)
    if family in FAMILY_EXPORTERS and vision_dtype != "auto":
        raise HuatuoError(f"--vision-dtype applies to LLaVA folders only ({src} is {family}, whose images go "
                          "through its mmproj); drop the option.")
    if family in FAMILY_EXPORTERS:
        module, function = FAMILY_EXPORTERS[family]
        return getattr(importlib.import_module(module, __package__), function)(
            src, out_dir, quant=quant, mmproj_type=mmproj_type, allow_pickle=allow_pickle, threads=threads,
            imatrix=imatrix, name=name, base_repo=base_repo, license=license)
    if quant not in DIRECT_TYPES and quant not in LLAMA_QUANTS:
        raise HuatuoError(f"Unknown quant {quant!r}: choose one of {', '.join([*DIRECT_TYPES, *LLAMA_QUANTS])}.")
    if mmproj_type not in MMPROJ_TYPES:
        raise HuatuoError(f"Unknown mmproj type {mmproj_type!r}: choose one of {', '.join(MMPROJ_TYPES)}.")
    check_dtype(vision_dtype)
    if imatrix is not None and quant not in LLAMA_QUANTS:
        raise HuatuoError("An importance matrix only helps llama.cpp's quants: "
                          f"use --imatrix with {', '.join(LLAMA_QUANTS)}.")
    ckpt = open_checkpoint(src, allow_pickle=allow_pickle)
    meta = model_meta(ckpt, name, base_repo, license)
    name = meta.name
    text_file, mmproj_file = f"{name}-{quant}.gguf", f"mmproj-{name}-{mmproj_type}.gguf"
    files, self_test = _earlier_conversion(out_dir, ckpt)
    with staging_dir(out_dir) as stage:
        imatrix_record = _write_text(ckpt, stage, text_file, quant, meta, threads or 0, imatrix)
        write_mmproj(ckpt, stage / mmproj_file, *MMPROJ_TYPES[mmproj_type], meta)
        vision_files, vision_record = (_write_vision(ckpt, stage, vision_dtype, quant, threads or 1, vision_gate)
                                       if vision_onnx else ([], None))
        if vision_onnx:
            self_test = _self_test(stage / text_file, stage / mmproj_file, stage / VISION_ONNX, threads or 1)
        extra = {"imatrix": imatrix_record} if imatrix_record else {}
        files.update({text_file: file_entry(stage / text_file, "text", quant=quant, **extra),
                      mmproj_file: file_entry(stage / mmproj_file, "mmproj", quant=mmproj_type)})
        if vision_onnx:        # an earlier conversion's vision entries (maybe another dtype) are replaced
            files = {n: e for n, e in files.items() if not n.startswith(VISION_ONNX)}
        files.update({p.name: file_entry(p, "vision" if p.name == VISION_ONNX else "data",
                                         quant=vision_record["dtype"]) for p in vision_files})
        manifest = _manifest(ckpt, name, files, self_test)
        if vision_record is not None:
            manifest["vision_onnx"] = vision_record
        write_manifest(stage, manifest)
        _write_docs(stage, Path(out_dir), meta, manifest, text_file, mmproj_file)
    return Path(out_dir) / text_file


def _write_docs(stage: Path, out_dir: Path, meta, manifest: dict, text_file: str, mmproj_file: str) -> None:
    """The Ollama Modelfile (this conversion's text GGUF) and the README.md model card
    (with FIDELITY.md's numbers when the folder already has that card)."""
    from huatuo_lite.eval.fidelity import FIDELITY_CARD

    from ..model_card import fidelity_from_card, write_card
    from .modelfile import write_modelfile

    others = sorted(e["quant"] for n, e in manifest["files"].items() if e["role"] == "text" and n != text_file)
    write_modelfile(stage, text_file, mmproj_file, manifest["text"]["n_ctx"], others)
    rows = fidelity_from_card(out_dir / FIDELITY_CARD)
    write_card(stage, meta, manifest, fidelity_rows=rows, fidelity_link=FIDELITY_CARD if rows else None)


def _earlier_conversion(out_dir, ckpt) -> tuple[dict, dict | None]:
    """Files (and self-test) of an earlier conversion of the same checkpoint in out_dir, kept
    so that one folder can hold several quants; another model's folder is refused."""
    if not (Path(out_dir) / MANIFEST_NAME).is_file():
        return {}, None
    old = read_manifest(out_dir)
    source = old.get("source", {})
    same = old.get("format") == "gguf" and source.get("config_sha256") == config_hash(ckpt) \
        and source.get("path") == str(Path(ckpt.root).resolve())
    if not same:
        raise HuatuoError(f"{out_dir} already holds a conversion of another model; choose an empty output folder.")
    kept = {name: entry for name, entry in old.get("files", {}).items()
            if (Path(out_dir) / name).is_file() and (Path(out_dir) / name).stat().st_size == entry.get("size")}
    return kept, old.get("mtmd_self_test")


def _write_text(ckpt, stage: Path, text_file: str, quant: str, meta, threads: int,
                imatrix=None) -> dict | None:
    """Write the text GGUF; returns the imatrix record when one was used."""
    if quant in DIRECT_TYPES:
        write_text_gguf(ckpt, stage / text_file, *DIRECT_TYPES[quant], meta)
        return None
    inter = INTERMEDIATE.get(_stored_dtype(ckpt), "F32")
    tmp = stage / f".{meta.name}-{inter}.intermediate"
    write_text_gguf(ckpt, tmp, *DIRECT_TYPES[inter], meta)
    try:
        if imatrix is not None:
            from .imatrix import quantize_with_imatrix

            return quantize_with_imatrix(tmp, stage / text_file, quant, imatrix, threads)
        llama_quantize(tmp, stage / text_file, quant, threads)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def _stored_dtype(ckpt) -> str:
    dtypes = {str(ckpt.dtype(n)).replace("torch.", "") for n in ckpt.names()}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def llama_quantize(src: Path, dst: Path, quant: str, threads: int = 0) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (also works on an mmproj)."""
    import llama_cpp

    from huatuo_lite.backends.gguf_llama import quiet_llama

    quiet_llama()   # llama.cpp prints a line per tensor otherwise
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANTS[quant])
    params.nthread = threads
    with _size_progress(dst, f"{dst.name} (llama.cpp {quant})"):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise HuatuoError(f"llama.cpp could not quantize {src.name} to {quant} (error {rc}); "
                          "try another --quant or report the model.")
    return dst


@contextmanager
def _size_progress(path: Path, desc: str, every_s: float = 0.5):
    """A tqdm bar on stderr fed with `path`'s growing size while the block runs: llama.cpp's
    quantizer is one blocking call with no progress callback (its own per-tensor log is
    silenced), and a 7B takes minutes."""
    bar = tqdm(desc=desc, unit="B", unit_scale=True, leave=False)
    done = threading.Event()

    def watch():
        while not done.wait(every_s):
            size = path.stat().st_size if path.exists() else 0
            bar.update(size - bar.n)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()


def _write_vision(ckpt, stage: Path, dtype: str, quant: str, threads: int,
                  gate: float | None) -> tuple[list[Path], dict]:
    """vision.onnx streamed from the checkpoint a tensor at a time (through torch.onnx
    the CLIP-L export alone peaked at 5.2 GB, the conversion's largest phase), in `dtype`
    (auto: gated; fp32 beside a REFERENCE_QUANTS text); returns its files and the manifest's
    "vision_onnx" record."""
    from ..onnx.vision_dtype import GATE_COSINE, write_vision

    exact = dtype == "auto" and quant in REFERENCE_QUANTS
    files, record = write_vision(ckpt, stage, VISION_ONNX, "fp32" if exact else dtype, threads,
                                 GATE_COSINE if gate is None else gate)
    return files, {**record, "requested": dtype, **({"reason": f"exact text quant {quant}"} if exact else {})}


def _self_test(text: Path, mmproj: Path, vision: Path, threads: int) -> dict:
    """libmtmd's image features vs vision.onnx's; recorded so the backend uses libmtmd
    by itself the day llama.cpp's LLaVA image graph is fixed."""
    from huatuo_lite.backends.gguf_mtmd import mtmd_self_test

    try:
        return mtmd_self_test(text, mmproj, vision, threads)
    except Exception as exc:   # a self-test that cannot run is a failed one, never a failed export
        return {"passed": False, "error": f"{type(exc).__name__}: {exc}"}


def _manifest(ckpt, name: str, files: dict, self_test: dict | None) -> dict:
    import llama_cpp

    text = ckpt.text
    eos = text.eos_token_id if isinstance(text.eos_token_id, list) else [text.eos_token_id]
    manifest = {
        "format": "gguf",
        "name": name,
        "variant": ckpt.variant.name,
        "files": files,
        "text": {"arch": text.arch, "n_embd": text.hidden_size, "n_vocab": text.vocab_size,
                 "n_ctx": _context_length(ckpt), "eos_token_ids": [e for e in eos if e is not None]},
        "vision": {"projector": ckpt.projector.kind, "mmproj_projector": PROJECTOR_TYPES[ckpt.projector.kind],
                   "n_embd_out": ckpt.projector.out_features, "image_size": ckpt.vision.image_size,
                   "image_tokens": (ckpt.vision.image_size // ckpt.vision.patch_size) ** 2},
        "source": source_entry(ckpt),
        "tools": {"huatuo-lite": version("huatuo-lite"), "gguf": version("gguf"),
                  "llama-cpp-python": llama_cpp.__version__, "onnx": version("onnx")},
    }
    if self_test is not None:
        manifest["mtmd_self_test"] = self_test
    return manifest


def _context_length(ckpt) -> int:
    """The context upstream trains/serves with (tokenizer_model_max_length), capped by the model's."""
    limit = ckpt.config.get("tokenizer_model_max_length") or CONTEXT_LENGTH
    return int(min(limit, ckpt.text.max_position_embeddings))


