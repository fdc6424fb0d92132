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

from pathlib import Path
from typing import Callable, Sequence

import gguf
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter

from huatuo_lite.errors import HuatuoError
from huatuo_lite.families import qwen25vl as family
from huatuo_lite.fsutil import staging_dir
from huatuo_lite.jsonrecords import read_json_object
from huatuo_lite.manifest import file_entry, write_manifest

from ..gguf.export import DIRECT_TYPES, INTERMEDIATE, LLAMA_QUANTS, _earlier_conversion, _stored_dtype, llama_quantize
from ..gguf.stream import write_streaming_gguf
from ..gguf.text import _bpe_vocab, add_hparams, text_arrays, text_plan
from ..model_meta import DEFAULT, add_general, model_meta
from ..provenance import source_entry, version
from . import gguf_vision

TEXT_ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN2VL]          # "qwen2vl"
ROPE_SECTIONS = 4                                         # llama.cpp reads 4 (time, row, col, unused)
MMPROJ_TYPES = {k: DIRECT_TYPES[k] for k in ("F32", "F16", "Q8_0")}
PREPROCESSOR = "preprocessor_config.json"
GENERATION = "generation_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")   # beside tokenizer_config.json's key


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

    ckpt = open_qwen25vl(src, allow_pickle=allow_pickle) if allow_pickle else open_qwen25vl(src)
    meta = model_meta(ckpt, name, base_repo, license)
    text_files = {q: f"{meta.name}-{q}.gguf" for q in quants}
    mmproj_file = f"mmproj-{meta.name}-{mmproj_type}.gguf"
    files, _ = _earlier_conversion(out_dir, ckpt)   # other quants of this checkpoint stay
    image, generation = image_config(ckpt), generation_config(ckpt)
    with staging_dir(out_dir) as stage:
        _write_texts(ckpt, stage, text_files, meta, threads or 0, say)
        say(f"mmproj {mmproj_type}")
        gguf_vision.write_mmproj(ckpt, stage / mmproj_file, *MMPROJ_TYPES[mmproj_type], image, meta)
        files.update({f: file_entry(stage / f, "text", quant=q) for q, f in text_files.items()})
        files[mmproj_file] = file_entry(stage / mmproj_file, "mmproj", quant=mmproj_type)
        verdict = None
        if self_test:
            say("libmtmd self-test")
            verdict = _self_test(ckpt, stage / text_files[quants[0]], stage / mmproj_file, threads or 1)
        manifest = build_manifest(ckpt, meta.name, files, image, generation, verdict)
        write_manifest(stage, manifest)
        _write_card(stage, Path(out_dir), meta, manifest)
    return Path(out_dir) / text_files[quants[0]]


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
    """mrope_section of the text config, padded to 4 with zeros (llama.cpp's key)."""
    cfg = text_config_dict(ckpt.config)
    sections = list((cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}).get("mrope_section") or [])
    head_pairs = ckpt.text.hidden_size // ckpt.text.num_heads // 2
    if not sections or len(sections) > ROPE_SECTIONS or sum(sections) != head_pairs:
        raise HuatuoError(f"{ckpt.root}/config.json's rope_scaling.mrope_section {sections or None} does not split "
                          f"the {head_pairs} rotary pairs of a head into at most {ROPE_SECTIONS} parts; the config "
                          "is not a Qwen2.5-VL one.")
    return sections + [0] * (ROPE_SECTIONS - len(sections))


def text_config_dict(config: dict) -> dict:
    """The text model's keys: the flat config.json with its text_config (transformers >= 4.52) over it."""
    return {**config, **(config.get("text_config") or {})}


def chat_template(ckpt) -> str | None:
    """The checkpoint's own chat template: chat_template.jinja, chat_template.json or
    tokenizer_config.json's key (the processor's and the tokenizer's are the same text)."""
    root = Path(ckpt.tokenizer_dir or ckpt.root)
    if (root / CHAT_TEMPLATE_FILES[0]).is_file():
        return (root / CHAT_TEMPLATE_FILES[0]).read_text(encoding="utf-8")
    for path, what in ((root / CHAT_TEMPLATE_FILES[1], "chat_template.json"), (root / "tokenizer_config.json", None)):
        if path.is_file():
            template = read_json_object(path, "download the tokenizer files again", HuatuoError).get("chat_template")
            if isinstance(template, str) and template:
                return template
    return None


def add_tokenizer(w: GGUFWriter, ckpt, generation: dict) -> None:
    """Qwen2's byte-level BPE (the LLaVA family's reader), pre-tokenizer qwen2; no BOS added."""
    text = ckpt.text
    vocab = _bpe_vocab(Path(ckpt.tokenizer_dir or ckpt.root), text.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    pad = generation.get("pad_token_id", text.pad_token_id)
    for add, token_id in ((w.add_bos_token_id, text.bos_token_id), (w.add_eos_token_id, text.eos_token_id),
                          (w.add_pad_token_id, pad)):
        if isinstance(token_id, int):
            add(token_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    template = chat_template(ckpt)
    if template:
        w.add_chat_template(template)


def write_text_gguf(ckpt, path: Path, qtype, file_type: int, meta) -> Path:
    """The language model in one ggml type (F32/F16/BF16/Q8_0; vectors stay F32)."""
    sections, generation = rope_sections(ckpt), generation_config(ckpt)

    def metadata(w: GGUFWriter) -> None:
        add_general(w, meta)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hparams(w, ckpt.text)
        w.add_rope_dimension_sections(sections)
        add_tokenizer(w, ckpt, generation)

    return write_streaming_gguf(path, TEXT_ARCH, metadata, text_plan(ckpt, qtype), text_arrays(ckpt),
                                desc=Path(path).name)


# ------------------------------------------------------------- manifest ----
def _json(ckpt, name: str) -> dict:
    path = Path(ckpt.root) / name
    return read_json_object(path, "download the model folder again", HuatuoError) if path.is_file() else {}


def image_config(ckpt) -> dict:
    """min/max pixels and mean/std of preprocessor_config.json (the family's defaults when absent)."""
    pre = _json(ckpt, PREPROCESSOR)
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}   # transformers 5 keeps them under "size"
    return {"min_pixels": int(pre.get("min_pixels") or size.get("shortest_edge") or family.MIN_PIXELS),
            "max_pixels": int(pre.get("max_pixels") or size.get("longest_edge") or family.MAX_PIXELS),
            "image_mean": [float(v) for v in pre.get("image_mean", family.IMAGE_MEAN)],
            "image_std": [float(v) for v in pre.get("image_std", family.IMAGE_STD)]}


def generation_config(ckpt) -> dict:
    """generation_config.json (keys the runtime samples with; the family's defaults for missing
    ones). do_sample false means greedy in HF whatever the temperature: temperature 0 here."""
    gen = _json(ckpt, GENERATION)
    defaults = family.GENERATION_DEFAULTS
    out = {key: gen.get(key, getattr(defaults, key))
           for key in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")}
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if key in gen:
            out[key] = gen[key]
    return out


def eos_token_ids(ckpt, generation: dict) -> list[int]:
    """generation_config's eos ids (<|im_end|> and <|endoftext|> upstream), else config.json's."""
    eos = generation.get("eos_token_id", ckpt.text.eos_token_id)
    eos = eos if isinstance(eos, list) else [eos]
    return [int(e) for e in eos if isinstance(e, int)]


def build_manifest(ckpt, name: str, files: dict, image: dict, generation: dict, self_test: dict | None) -> dict:
    import llama_cpp

    text, vision = ckpt.text, gguf_vision.vision_config(ckpt.config)
    manifest = {
        "format": "gguf",
        "family": family.NAME,
        "name": name,
        "variant": family.VARIANT.name,
        "files": files,
        "text": {"arch": text.arch, "gguf_arch": TEXT_ARCH, "n_embd": text.hidden_size, "n_vocab": text.vocab_size,
                 "n_ctx": int(min(family.CONTEXT_LENGTH, text.max_position_embeddings)),
                 "eos_token_ids": eos_token_ids(ckpt, generation), "rope_sections": rope_sections(ckpt)},
        "vision": {"mmproj_projector": gguf_vision.PROJECTOR, "n_embd_out": vision["out_hidden_size"],
                   "patch_size": family.PATCH_SIZE, "merge_size": family.MERGE_SIZE},
        "image": {"min_pixels": image["min_pixels"], "max_pixels": image["max_pixels"]},
        "generation": {k: v for k, v in generation.items() if not k.endswith("_token_id")},
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


__all__ = ["export_qwen25vl_gguf", "write_text_gguf", "build_manifest", "image_config", "generation_config",
           "rope_sections", "TEXT_ARCH", "MMPROJ_TYPES"]
