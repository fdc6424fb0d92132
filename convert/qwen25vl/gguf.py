"""`huatuo-lite convert gguf` for a Qwen2.5-VL checkpoint: text GGUF (arch `qwen2vl`) + mmproj
(`qwen2.5vl_merger`, gguf_vision.py) + manifest, through a staging folder.

The text model is a Qwen2 with multimodal RoPE: llama.cpp's `qwen2vl` arch is `qwen2`'s tensors
and keys plus `rope.dimension_sections` (mrope_section [16, 24, 24] padded to 4 with a 0) and
takes 4 position streams per token for embeddings (libmtmd fills them) or one for plain tokens
(all streams equal: ordinary RoPE). Tensor names, q/k layout (NEOX rope: no permutation), the
streamed row-block quantisation, llama.cpp's quantizer and the vocabulary reader are the LLaVA
family's (convert/gguf/); only the metadata differs. The chat template is the checkpoint's own.
"""
from __future__ import annotations

from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import gguf
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter

from huatuo_lite.errors import HuatuoError
from huatuo_lite.families import qwen25vl as family
from huatuo_lite.families.text import QWEN2
from huatuo_lite.fsutil import staging_dir
from huatuo_lite.jsonrecords import read_json_object
from huatuo_lite.manifest import file_entry, write_manifest

from ..gguf.export import DIRECT_TYPES, INTERMEDIATE, LLAMA_QUANTS, _earlier_conversion, _stored_dtype, llama_quantize
from ..gguf.stream import iter_mapped, write_streaming_gguf
from ..gguf.text import _bpe_vocab, add_hparams, gguf_name, text_plan
from ..model_meta import DEFAULT, add_general, model_meta
from ..provenance import source_entry, version
from . import gguf_vision

TEXT_ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN2VL]          # "qwen2vl"
ROPE_SECTIONS = 4                                         # llama.cpp reads 4 (time, row, col, unused)
MMPROJ_TYPES = {k: DIRECT_TYPES[k] for k in ("F32", "F16", "Q8_0")}
PREPROCESSOR = "preprocessor_config.json"
GENERATION = "generation_config.json"
TEXT_PREFIXES = ("model.", "lm_head.")                   # canonical names of the language model


def export_qwen25vl_gguf(src, out_dir, quant: str | Sequence[str] = "F16", mmproj_type: str = "F16",
                         threads: int | None = None, self_test: bool = True,
                         progress: Callable[[str], None] | None = None, allow_pickle: bool = False,
                         imatrix=None, name: str | None = None, base_repo=DEFAULT, license=DEFAULT,  # noqa: A002
                         **_llava_only) -> Path:
    """Convert the Qwen2.5-VL folder `src` into `out_dir`: one text GGUF per quant (a name or a
    list), the mmproj in `mmproj_type`, manifest.json and README.md; returns the first text GGUF.
    `self_test`: compare libmtmd's image features with transformers' tower (recorded as
    "mtmd_self_test"). `progress(phase)`: called as each phase starts. `_llava_only`: options
    of the LLaVA family's export (vision_onnx) that do not apply here."""
    quants = [quant] if isinstance(quant, str) else list(quant)
    _check_options(quants, mmproj_type, imatrix)
    say = progress or (lambda phase: None)
    from .checkpoint import open_qwen25vl

    ckpt = open_qwen25vl(src, allow_pickle=allow_pickle)
    meta = model_meta(ckpt, name, base_repo, license)
    text_files = {q: f"{meta.name}-{q}.gguf" for q in quants}
    mmproj_file = f"mmproj-{meta.name}-{mmproj_type}.gguf"
    files, _ = _earlier_conversion(out_dir, ckpt)   # other quants of this checkpoint stay
    image = image_config(ckpt)
    with _removed_if_new(Path(out_dir)), staging_dir(out_dir) as stage:
        _write_texts(ckpt, stage, text_files, meta, threads or 0, say)
        say(f"mmproj {mmproj_type}")
        gguf_vision.write_mmproj(ckpt, stage / mmproj_file, *MMPROJ_TYPES[mmproj_type], image, meta)
        files.update({f: file_entry(stage / f, "text", quant=q) for q, f in text_files.items()})
        files[mmproj_file] = file_entry(stage / mmproj_file, "mmproj", quant=mmproj_type)
        verdict = None
        if self_test:
            say("libmtmd self-test")
            verdict = _self_test(ckpt, stage / text_files[quants[0]], stage / mmproj_file, threads or 1)
        manifest = build_manifest(ckpt, meta.name, files, image, verdict)
        write_manifest(stage, manifest)
        _write_card(stage, Path(out_dir), meta, manifest)
    return Path(out_dir) / text_files[quants[0]]


@contextmanager
def _removed_if_new(out_dir: Path):
    """An output folder this run created is removed again when the run fails or is
    interrupted (staging_dir has already removed what was written inside it)."""
    new = not out_dir.exists()
    try:
        yield
    except BaseException:
        if new:
            with suppress(OSError):
                out_dir.rmdir()        # only when empty: never anything a user put there meanwhile
        raise


def _check_options(quants: list, mmproj_type: str, imatrix) -> None:
    offered = [*DIRECT_TYPES, *LLAMA_QUANTS]
    unknown = [q for q in quants if q not in offered]
    if unknown or not quants:
        raise HuatuoError(f"Unknown quant {unknown[0] if unknown else None!r}: choose one or more of {', '.join(offered)}.")
    if mmproj_type not in MMPROJ_TYPES:
        raise HuatuoError(f"Unknown mmproj type {mmproj_type!r} for a Qwen2.5-VL model: choose one of "
                          f"{', '.join(MMPROJ_TYPES)}.")
    if imatrix is not None:
        raise HuatuoError("--imatrix is not supported for Qwen2.5-VL models yet: convert without it.")


# ------------------------------------------------------------ text GGUF ----
def _write_texts(ckpt, stage: Path, text_files: dict, meta, threads: int, say) -> None:
    """Direct types are written by the gguf package; llama.cpp's quants from one lossless
    intermediate (BF16 for a bf16 checkpoint, else F32), written once and deleted after."""
    for quant, file in text_files.items():
        if quant in DIRECT_TYPES:
            say(f"text {quant}")
            write_text_gguf(ckpt, stage / file, *DIRECT_TYPES[quant], meta)
    wanted = [q for q in text_files if q in LLAMA_QUANTS]
    if not wanted:
        return
    inter = INTERMEDIATE.get(_stored_dtype(ckpt), "F32")
    tmp = stage / f".{meta.name}-{inter}.intermediate"
    say(f"text {inter} (intermediate)")
    write_text_gguf(ckpt, tmp, *DIRECT_TYPES[inter], meta)
    try:
        for quant in wanted:
            say(f"text {quant}")
            llama_quantize(tmp, stage / text_files[quant], quant, threads)
    finally:
        tmp.unlink(missing_ok=True)


def rope_sections(ckpt) -> list[int]:
    """mrope_section (time, row, col rotary pairs; the reader checked they fill a head) padded
    to llama.cpp's 4 with zeros."""
    sections = list(ckpt.text.mrope_section)
    if len(sections) > ROPE_SECTIONS:
        raise HuatuoError(f"{ckpt.root}/config.json's mrope_section {sections} has more than {ROPE_SECTIONS} parts, "
                          "which llama.cpp's qwen2vl model cannot hold; it cannot be converted to GGUF.")
    return sections + [0] * (ROPE_SECTIONS - len(sections))


def text_arrays(ckpt):
    """(GGUF name, stored tensor) of the language model, streamed; qwen2's NEOX rope takes
    HF's q/k rows as they are (no permutation)."""
    def convert(name, tensor):
        mapped = gguf_name(name)
        return None if mapped is None else (mapped[0], tensor)

    for prefix in TEXT_PREFIXES:       # never loads the vision tower's tensors
        yield from iter_mapped(ckpt.iter_tensors(prefix), convert)


def special_ids(ckpt) -> dict:
    """bos / eos / pad ids for the GGUF: config.json's bos and eos (eos <|im_end|> in an Instruct
    model; llama.cpp also ends on <|endoftext|> by its text), generation_config's pad."""
    text = {**ckpt.config, **(ckpt.config.get("text_config") or {})}
    return {"bos": text.get("bos_token_id"), "eos": text.get("eos_token_id"),
            "pad": _json(ckpt, GENERATION).get("pad_token_id", text.get("pad_token_id"))}


def add_tokenizer(w: GGUFWriter, ckpt) -> None:
    """Qwen2's byte-level BPE (the LLaVA family's reader), pre-tokenizer qwen2, no BOS added,
    the checkpoint's own chat template (the processor's and the tokenizer's are the same text)."""
    vocab = _bpe_vocab(Path(ckpt.tokenizer_dir), ckpt.text.vocab_size)
    w.add_tokenizer_model(QWEN2.gguf_tokenizer)
    w.add_tokenizer_pre(QWEN2.gguf_pre)
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    ids = special_ids(ckpt)
    for add, token_id in ((w.add_bos_token_id, ids["bos"]), (w.add_eos_token_id, ids["eos"]),
                          (w.add_pad_token_id, ids["pad"])):
        if isinstance(token_id, int):
            add(token_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if ckpt.chat_template:
        w.add_chat_template(ckpt.chat_template)


def write_text_gguf(ckpt, path: Path, qtype, file_type: int, meta) -> Path:
    """The language model in one ggml type (F32/F16/BF16/Q8_0; vectors stay F32)."""
    sections = rope_sections(ckpt)

    def metadata(w: GGUFWriter) -> None:
        add_general(w, meta)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hparams(w, ckpt.text)
        w.add_rope_dimension_sections(sections)
        add_tokenizer(w, ckpt)

    return write_streaming_gguf(path, TEXT_ARCH, metadata, text_plan(ckpt, qtype), text_arrays(ckpt),
                                desc=Path(path).name)


# ------------------------------------------------------------- manifest ----
def _json(ckpt, name: str) -> dict:
    path = Path(ckpt.root) / name
    return read_json_object(path, "download the model folder again", HuatuoError) if path.is_file() else {}


def image_config(ckpt) -> dict:
    """min/max pixels (the reader's) and image mean/std of preprocessor_config.json (CLIP's
    when absent, as Qwen2VLImageProcessor's defaults)."""
    pre = _json(ckpt, PREPROCESSOR)
    low, high = ckpt.image_pixels
    return {"min_pixels": int(low), "max_pixels": int(high),
            "image_mean": [float(v) for v in pre.get("image_mean", family.IMAGE_MEAN)],
            "image_std": [float(v) for v in pre.get("image_std", family.IMAGE_STD)]}


def build_manifest(ckpt, name: str, files: dict, image: dict, self_test: dict | None) -> dict:
    import llama_cpp

    text, vision = ckpt.text, ckpt.vision
    manifest = {
        "format": "gguf",
        "family": family.NAME,
        "name": name,
        "variant": family.VARIANT.name,
        "files": files,
        "text": {"arch": QWEN2.name, "gguf_arch": TEXT_ARCH, "n_embd": text.hidden_size, "n_vocab": text.vocab_size,
                 "n_ctx": int(min(family.CONTEXT_LENGTH, text.max_position_embeddings)),
                 "eos_token_ids": sorted(ckpt.eos_token_ids), "rope_sections": rope_sections(ckpt)},
        "vision": {"mmproj_projector": gguf_vision.PROJECTOR, "n_embd_out": vision.out_hidden_size,
                   "patch_size": family.PATCH_SIZE, "merge_size": family.MERGE_SIZE},
        "image": {"min_pixels": image["min_pixels"], "max_pixels": image["max_pixels"]},
        "generation": asdict(ckpt.generation),
        "source": source_entry(ckpt),
        "tools": {"huatuo-lite": version("huatuo-lite"), "gguf": version("gguf"),
                  "llama-cpp-python": llama_cpp.__version__, "transformers": version("transformers")},
    }
    if self_test is not None:
        manifest["mtmd_self_test"] = self_test
    return manifest


def _self_test(ckpt, text: Path, mmproj: Path, threads: int) -> dict:
    try:
        return gguf_vision.mtmd_self_test(ckpt, text, mmproj, threads)
    except Exception as exc:   # a self-test that cannot run is a failed one, never a failed export
        return {"passed": False, "error": f"{type(exc).__name__}: {exc}"}


def _write_card(stage: Path, out_dir: Path, meta, manifest: dict) -> None:
    """README.md (the model card; FIDELITY.md's numbers when out_dir has one). No Ollama
    Modelfile: convert/gguf/modelfile.py renders the LLaVA family's prompt."""
    from huatuo_lite.eval.fidelity import FIDELITY_CARD

    from ..model_card import fidelity_from_card, write_card

    rows = fidelity_from_card(out_dir / FIDELITY_CARD)
    write_card(stage, meta, manifest, fidelity_rows=rows, fidelity_link=FIDELITY_CARD if rows else None)
