"""`huatuo-lite convert onnx`: upstream folder -> vision.onnx + embed.onnx +
decoder.onnx (+ .data files) + tokenizer files + manifest.json.

Three graphs split as vision models are (pixels -> features, ids -> embeddings,
embeddings -> logits); onnxruntime-genai cannot load them (README, ONNX).

  embed, decoder  written by onnx_stream straight in the asked quant: the graph
                  structure from the config (onnx_builder), each weight streamed
                  from the checkpoint, converted/quantized per tensor in chunks
                  (peak memory ~ one stored tensor, not the model: a real 7B or
                  34B converts on a laptop-class machine).
  vision          the same way (onnx_vision_stream), fp32 or int8; the torch
                  route (onnx_vision + torch.onnx, then onnx_quant) stays as
                  `exporter="torchscript"|"dynamo"` (it peaked at 4.7 GB above
                  baseline for the real CLIP-L tower).

`quantize_onnx` makes a quantized folder from an fp32 one with onnxruntime's
graph quantizer, without torch (it loads the whole graph: for small models).
Everything is written in a staging folder and moved into OUT_DIR when
complete; a quantized vision graph's fp32 intermediate lives in a scratch
folder inside it that is always removed.
"""
from __future__ import annotations

import importlib
import json
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from huatuo_lite.errors import HuatuoError
from huatuo_lite.families import qwen25vl
from huatuo_lite.families.llava import CONTEXT_LENGTH, IMAGE_TOKENS
from huatuo_lite.eval.fidelity import FIDELITY_CARD
from huatuo_lite.fsutil import staging_dir
from huatuo_lite.manifest import check_sizes, file_entry, read_manifest, write_manifest

from ..model_card import fidelity_from_card, write_card
from ..model_meta import DEFAULT, model_meta
from ..provenance import source_entry, version
from ..checkpoint.read import open_checkpoint
from .graph import EXPORTERS, check_graph
from .algorithms import CALIBRATED, INT4_DEFAULT, NBitsPlan, check_plan, default_symmetric
from .quant import QUANT_BITS, QUANT_MODES, VISION_QUANT_MODES, check_mode, quantize_gptq, quantize_graph
from .stream import export_decoder_streamed, export_embed_streamed
from .vision import export_vision
from .vision_stream import export_vision_streamed

VISION, EMBED, DECODER = "vision.onnx", "embed.onnx", "decoder.onnx"
STREAM = "stream"            # the default exporter: graphs built from the config, weights streamed
GRAPHS = {VISION: "vision", EMBED: "embed", DECODER: "decoder"}   # graph file -> role in the manifest
STREAMED = {EMBED: export_embed_streamed, DECODER: export_decoder_streamed}
# text quant -> how the embedding table is stored. Gather quantizes only to 4 bits
# in onnxruntime 1.32, so int8 keeps an fp16 table (exact to fp16 rounding).
EMBED_QUANT = {"fp32": "fp32", "fp16": "fp16", "int8": "fp16", "int4": "int4"}
# family name (checkpoint.family.folder_family) -> the module converting that family (by
# name: it builds on this one)
FAMILY_EXPORTERS = {qwen25vl.NAME: "huatuo_lite.convert.qwen25vl.onnx_export"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt")


def export_onnx(src, out_dir, quant: str = "int4", vision_quant: str = "fp32", block_size: int = 32,
                force_external_data: bool = False, exporter: str = STREAM,
                allow_pickle: bool = False, name: str | None = None, base_repo=DEFAULT,
                license=DEFAULT, algorithm: str | None = None, symmetric: bool | None = None,  # noqa: A002
                keep_int8: str | None = None, calibration=None, embed_quant: str | None = None) -> Path:
    """Convert `src` into `out_dir`; returns the path of decoder.onnx. `exporter`
    picks the vision route (embed and decoder are always streamed). `name`, `base_repo`,
    `license`: the model's identity for the manifest and the README.md card (model_meta).
    int4 only: `algorithm` (onnx_algorithms.ALGORITHMS), `symmetric` (None: the
    algorithm's own), `keep_int8` (parts at 8 bits), `calibration` (records, gptq),
    `embed_quant` (the token table: int4 or fp16). None: INT4_DEFAULT for int4.
    A folder of another family goes to that family's exporter (FAMILY_EXPORTERS)."""
    family = family_exporter(src)
    if family is not None:
        return family.export_onnx(src, out_dir, quant=quant, vision_quant=vision_quant, block_size=block_size,
                                  force_external_data=force_external_data, exporter=exporter,
                                  allow_pickle=allow_pickle, name=name, base_repo=base_repo, license=license,
                                  algorithm=algorithm, symmetric=symmetric, keep_int8=keep_int8,
                                  calibration=calibration, embed_quant=embed_quant)
    _check_options(quant, vision_quant, block_size)
    plan = int4_plan(quant, block_size, algorithm, symmetric, keep_int8, calibration)
    if quant == "int4" and embed_quant is None:
        embed_quant = INT4_DEFAULT["embed_quant"]
    embed_quant = _embed_quant(quant, embed_quant)
    if exporter not in (STREAM, *EXPORTERS):
        raise HuatuoError(f"Unknown ONNX exporter {exporter!r}: choose one of {', '.join((STREAM, *EXPORTERS))}.")
    ckpt = open_checkpoint(src, allow_pickle=allow_pickle)
    modes = {EMBED: embed_quant, DECODER: quant}
    with staging_dir(out_dir) as stage:
        files = _export_vision(ckpt, stage, vision_quant, block_size, force_external_data, exporter)
        for name, export in tqdm(STREAMED.items(), desc=f"onnx {quant}", unit="graph", leave=False):
            if name == DECODER:
                written = _export_decoder(ckpt, stage, quant, block_size, force_external_data, plan)
            else:
                written = export(ckpt, stage / name, modes[name], block_size, force_external_data)
            check_graph(stage / name)
            files.update(_graph_entries(name, written, modes[name]))
        for path in copy_tokenizer(ckpt, stage):
            files[path.name] = file_entry(path, "tokenizer")
        meta = model_meta(ckpt, name or _model_name(ckpt), base_repo, license)
        manifest = _manifest(ckpt, files, _onnx_section(quant, vision_quant, block_size, plan, embed_quant))
        manifest["name"] = meta.name
        write_manifest(stage, manifest)
        rows = fidelity_from_card(Path(out_dir) / FIDELITY_CARD)
        write_card(stage, meta, manifest, fidelity_rows=rows, fidelity_link=FIDELITY_CARD if rows else None)
    return Path(out_dir) / DECODER


def family_exporter(src):
    """The exporter module of a non-LLaVA folder, recognised by config.json's architectures /
    model_type; None for LLaVA folders and for anything open_checkpoint should judge."""
    from ..checkpoint.family import folder_family

    module = FAMILY_EXPORTERS.get(folder_family(src))
    return importlib.import_module(module) if module else None


def int4_plan(quant: str, block_size: int, algorithm: str | None = None, symmetric: bool | None = None,
              keep_int8: str | None = None, calibration=None) -> NBitsPlan:
    """The checked int4 plan (options left None: INT4_DEFAULT); the int4 options given
    with another --quant are one sentence."""
    if quant != "int4":
        given = [f"--{k}" for k, v in (("algorithm", algorithm), ("symmetric", symmetric),
                                       ("keep-int8", keep_int8), ("calibration", calibration)) if v is not None]
        if given:
            raise HuatuoError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --quant int4 only; "
                              f"drop {'it' if len(given) == 1 else 'them'} for --quant {quant}.")
        return NBitsPlan()
    if calibration is not None and not Path(calibration).is_file():
        raise HuatuoError(f"Calibration file {calibration} does not exist; give a JSON list of PubMedVision "
                          "or eval-format records.")
    algorithm = INT4_DEFAULT["algorithm"] if algorithm is None else algorithm
    if keep_int8 is None:            # gptq cannot keep parts at 8 bits (check_plan)
        keep_int8 = "none" if algorithm in CALIBRATED else INT4_DEFAULT["keep_int8"]
    sym = default_symmetric(algorithm) if symmetric is None else bool(symmetric)
    return check_plan(NBitsPlan(algorithm, sym, keep_int8, str(calibration) if calibration else None), block_size)


def _embed_quant(quant: str, embed_quant: str | None) -> str:
    """The token table's storage: int4 models may keep it fp16 (GatherBlockQuantized is
    4-bit only in onnxruntime 1.32, so fp16 is the next step up); others as EMBED_QUANT."""
    if embed_quant is None or embed_quant == EMBED_QUANT[quant]:
        return EMBED_QUANT[quant]
    if quant == "int4" and embed_quant == "fp16":
        return embed_quant
    raise HuatuoError(f"--embed-quant {embed_quant} is not supported with --quant {quant}: "
                      f"use {EMBED_QUANT[quant]}" + (" or fp16." if quant == "int4" else "."))


def _export_decoder(ckpt, stage: Path, quant: str, block_size: int, force_external_data: bool,
                    plan: NBitsPlan) -> list[Path]:
    """decoder.onnx streamed, or for GPTQ streamed in fp32 into a scratch folder and
    quantized whole from there (onnx_quant.quantize_gptq: the memory it needs)."""
    if quant != "int4" or plan.algorithm not in CALIBRATED:
        return export_decoder_streamed(ckpt, stage / DECODER, quant, block_size, force_external_data, plan)
    from .calibrate import DecoderCalibration

    reader = DecoderCalibration(ckpt, plan.calibration)
    with tempfile.TemporaryDirectory(prefix=".scratch-", dir=stage) as scratch:
        fp32 = Path(scratch) / DECODER
        export_decoder_streamed(ckpt, fp32, "fp32", block_size)   # inline when < 2 GB: the quantizer loads bytes
        return quantize_gptq(fp32, stage / DECODER, block_size=block_size, symmetric=plan.symmetric,
                             reader=reader, force=force_external_data)


def _export_vision(ckpt, stage: Path, vision_quant: str, block_size: int, force_external_data: bool,
                   exporter: str) -> dict:
    """vision.onnx streamed, or through torch in fp32 then quantized from a scratch
    copy when asked; returns its manifest entries."""
    if exporter == STREAM:
        written = export_vision_streamed(ckpt, stage / VISION, vision_quant, block_size, force_external_data)
    elif vision_quant == "fp32":
        written = export_vision(ckpt, stage / VISION, force_external_data=force_external_data, exporter=exporter)
    else:
        with tempfile.TemporaryDirectory(prefix=".scratch-", dir=stage) as scratch:
            fp32 = Path(scratch) / VISION
            export_vision(ckpt, fp32, exporter=exporter)
            written = quantize_graph(fp32, stage / VISION, vision_quant, block_size=block_size,
                                     force_external_data=force_external_data)
    check_graph(stage / VISION)
    return _graph_entries(VISION, written, vision_quant)


def quantize_onnx(fp32_dir, out_dir, quant: str = "int4", vision_quant: str = "fp32", block_size: int = 32,
                  force_external_data: bool = False) -> Path:
    """A quantized model folder from an fp32 one written by export_onnx (no torch
    needed: one fp32 export serves every quant). Returns out_dir/decoder.onnx."""
    _check_options(quant, vision_quant, block_size)
    base = read_manifest(fp32_dir)
    if base.get("format") != "onnx" or base.get("onnx", {}).get("quant") != "fp32" \
            or base["onnx"].get("vision_quant") != "fp32":
        raise HuatuoError(f"{fp32_dir} is not an fp32 ONNX export; quantize from `convert onnx --quant fp32` output.")
    check_sizes(fp32_dir, base)
    modes = {VISION: vision_quant, EMBED: EMBED_QUANT[quant], DECODER: quant}
    files = {}
    with staging_dir(out_dir) as stage:
        for name in tqdm(GRAPHS, desc=f"onnx {quant}", unit="graph", leave=False):
            written = quantize_graph(Path(fp32_dir) / name, stage / name, modes[name], block_size=block_size,
                                     gather=name == EMBED, force_external_data=force_external_data)
            check_graph(stage / name)
            files.update(_graph_entries(name, written, modes[name]))
        for name, entry in base["files"].items():
            if entry["role"] == "tokenizer":
                shutil.copyfile(Path(fp32_dir) / name, stage / name)
                files[name] = file_entry(stage / name, "tokenizer")
        write_manifest(stage, {**base, "files": files, "tools": _tools(),
                               "onnx": _onnx_section(quant, vision_quant, block_size)})
    return Path(out_dir) / DECODER


def _check_options(quant: str, vision_quant: str, block_size: int) -> None:
    check_mode(quant)
    check_mode(vision_quant, VISION_QUANT_MODES, "--vision-quant")
    if block_size < 16 or block_size & (block_size - 1):
        raise HuatuoError(f"--block-size {block_size} is not supported: use a power of two >= 16 (32 is the default).")


def _graph_entries(name: str, written: list, mode: str) -> dict:
    role = GRAPHS[name]
    return {p.name: file_entry(p, role if p.name == name else "data", quant=mode) for p in written}


def copy_tokenizer(ckpt, stage: Path) -> list[Path]:
    """The tokenizer files, always including tokenizer.json (the runtime reads it
    with the `tokenizers` library): a SentencePiece-only folder gets one made by
    transformers' slow->fast converter here."""
    source = Path(ckpt.tokenizer_dir)
    written = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, stage / name)
            written.append(stage / name)
    if not (stage / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(str(source), use_fast=True)
        if not getattr(fast, "is_fast", False):
            raise HuatuoError(f"The tokenizer in {source} cannot be converted to tokenizer.json; "
                              "add a tokenizer.json to the checkpoint folder.")
        fast.backend_tokenizer.save(str(stage / "tokenizer.json"))
        written.append(stage / "tokenizer.json")
    return written


def eos_token_ids(ckpt) -> list[int]:
    """eos from config.json and generation_config.json (int or list)."""
    ids = set()
    sources = [ckpt.text.eos_token_id]
    gen_path = Path(ckpt.root) / "generation_config.json"
    if gen_path.is_file():
        sources.append(json.loads(gen_path.read_text(encoding="utf-8")).get("eos_token_id"))
    for value in sources:
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return sorted(int(i) for i in ids)


def context_length(ckpt) -> int:
    """Upstream's tokenizer_model_max_length (4096), capped by the position table."""
    max_len = ckpt.config.get("tokenizer_model_max_length") or CONTEXT_LENGTH
    return int(min(max_len, ckpt.text.max_position_embeddings))


def _onnx_section(quant: str, vision_quant: str, block_size: int, plan: NBitsPlan | None = None,
                  embed_quant: str | None = None) -> dict:
    section = {"quant": quant, "vision_quant": vision_quant, "embed_quant": embed_quant or EMBED_QUANT[quant],
               "block_size": block_size if quant in QUANT_BITS else None,
               "graphs": {"vision": VISION, "embed": EMBED, "decoder": DECODER}}
    if quant == "int4" and plan is not None:
        section["int4"] = {"algorithm": plan.algorithm, "symmetric": plan.symmetric, "keep_int8": plan.keep_int8,
                           "calibration": Path(plan.calibration).name if plan.calibration else None}
    return section


def _tools() -> dict:
    return {name: version(name) for name in
            ("huatuo-lite", "torch", "transformers", "onnx", "onnxruntime", "onnxscript")}


def _manifest(ckpt, files: dict, onnx_section: dict) -> dict:
    text = ckpt.text
    return {
        "format": "onnx",
        "name": _model_name(ckpt),
        "variant": getattr(getattr(ckpt, "variant", None), "name", None),
        "files": files,
        "text": {"arch": text.arch, "n_embd": text.hidden_size, "n_vocab": text.vocab_size,
                 "n_layer": text.num_layers, "n_head_kv": text.num_kv_heads,
                 "head_dim": text.hidden_size // text.num_heads,
                 "n_ctx": context_length(ckpt), "eos_token_ids": eos_token_ids(ckpt)},
        "vision": {"projector": ckpt.projector.kind, "n_embd_out": ckpt.projector.out_features,
                   "image_size": ckpt.vision.image_size, "image_tokens": IMAGE_TOKENS},
        "onnx": onnx_section,
        "source": source_entry(ckpt),
        "tools": _tools(),
    }


def _model_name(ckpt) -> str:
    raw = str(ckpt.config.get("_name_or_path") or "").rstrip("/")
    return raw.rsplit("/", 1)[-1] if raw and not raw.startswith((".", "/")) else Path(ckpt.root).resolve().name


__all__ = ["export_onnx", "quantize_onnx", "QUANT_MODES", "VISION_QUANT_MODES"]
